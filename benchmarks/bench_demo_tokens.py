"""Tokens per example of the demo's tasks at two input caps (`data.max_length`), prompt included: the ratio is
what a train step or a scoring pass costs at the lower cap against the higher (close to linear at these lengths).

    .venv/bin/python benchmarks/bench_demo_tokens.py --backbone smollm2-135m --caps 64 48

A count, not a timing: it does not depend on the load of the machine.
"""

import argparse
import json

TASKS = ("tweet_sentiment", "drug_sentiment", "bbc_topic", "drug_condition")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="smollm2-135m")
    ap.add_argument("--caps", type=int, nargs=2, default=[64, 48], metavar=("BEFORE", "AFTER"))
    ap.add_argument("--prompt-length", type=int, default=20)
    args = ap.parse_args()

    from ptx.backbones import load_backbone
    from ptx.data import encode_split
    from ptx.tasks import load_task

    bb = load_backbone(args.backbone)
    out = {}
    for split, limit in (("train", 1000), ("test", 80)):  # the demo's train_limit and test_limit
        for task in TASKS:
            mean = []
            for cap in args.caps:
                lengths = [len(ids) for ids in encode_split(load_task(task, max_length=cap), bb, split, limit)["input_ids"]]
                mean.append(sum(lengths) / len(lengths))
            out[f"{split}/{task}"] = {"text_tokens": [round(m, 1) for m in mean],
                                      "ratio": round((args.prompt_length + mean[1]) / (args.prompt_length + mean[0]), 3)}
    train = [v["ratio"] for k, v in out.items() if k.startswith("train/")]
    print(json.dumps({"caps": args.caps, "per_split_task": out, "mean_train_ratio": round(sum(train) / len(train), 3)},
                     indent=1))


if __name__ == "__main__":
    main()
