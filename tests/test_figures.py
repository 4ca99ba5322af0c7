"""ptx.figures: the stages' PNGs drawn with the report's plots (a small hand-made table; no training, no Ray)."""

import pandas as pd

from ptx import figures


def _table() -> pd.DataFrame:
    rows = []
    for split in ("dev", "test"):
        for src, scat in (("sst2", "sentiment"), ("imdb", "sentiment"), ("mnli", "nli"), ("random", "random")):
            for tgt, tcat in (("sst2", "sentiment"), ("imdb", "sentiment"), ("mnli", "nli")):
                value = 0.9 if src == tgt else 0.5
                rows.append({"split": split, "source_task": src, "source_category": scat, "target_task": tgt,
                             "target_category": tcat, "source_prompt_run": src, "metric": "accuracy",
                             "value": value, "relative_value": value / 0.9})
    return pd.DataFrame(rows)


def test_transfer_heatmaps_draws_the_absolute_and_relative_panels_of_one_split(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(figures, "save", lambda fig, path: drawn.append(fig) or path)
    figures.transfer_heatmaps(_table(), "test", tmp_path / "heatmap_test.png", "tiny-bert")
    fig = drawn[0]
    heat = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in heat] == ["tiny-bert · test split · absolute transfer",
                                               "tiny-bert · test split · relative transfer"]
    assert [t.get_text() for t in heat[0].get_xticklabels()] == ["mnli", "imdb", "sst2", "random"]
    assert any(a.get_xlabel() == "score ÷ target's own prompt" for a in fig.axes)  # the relative colour bar
    assert any(a.get_xlabel() == "score (accuracy)" for a in fig.axes)
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in heat[1].texts}
    assert texts[2, 2] == "1.00" and texts[2, 1] == "0.56"  # sst2's own prompt; imdb's prompt on sst2
    monkeypatch.undo()
    path = figures.transfer_heatmaps(_table(), "dev", tmp_path / "heatmap_dev.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_convergence_png_draws_every_seed_and_vanilla_best_dashed(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(figures, "save", lambda fig, path: drawn.append(fig) or path)
    curves = [(0, [(0, 0.5), (10, 0.7), (20, 0.8)], [(0, 0.6), (10, 0.8)]),
              (1, [(0, 0.4), (10, 0.75)], [(0, 0.7), (10, 0.76)])]
    figures.convergence_png(curves, "sst2", "accuracy", tmp_path / "curves_sst2.png")
    (ax,) = [a for a in drawn[0].axes if a.get_visible()]
    solid = [ln for ln in ax.lines if ln.get_linestyle() == "-"]
    dashed = sorted(float(ln.get_ydata()[0]) for ln in ax.lines if ln.get_linestyle() == "--")
    assert [list(ln.get_ydata()) for ln in solid] == [[0.5, 0.7, 0.8], [0.6, 0.8], [0.4, 0.75], [0.7, 0.76]]
    assert dashed == [0.75, 0.8]  # each seed's vanilla best
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["vanilla PT", "TPT"]
    assert ax.get_title() == "sst2: vanilla PT vs TPT (2 seed(s))" and ax.get_ylabel() == "dev accuracy"
