"""The dropout study: the batched program equals the per-config loop, the task overfits where it
should, bad input is refused in one line, the findings follow the numbers, the summary is stable."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from lora_core.dropout_study import (
    DEFAULT_STUDY,
    MAX_SAMPLES,
    DropoutStudy,
    batch_rows,
    check_study,
    dropout_findings,
    dropout_study_loop,
    dropout_table,
    run_dropout_study,
    study_summary,
)
from lora_core.errors import InputError

KEYS = ["rank", "step", "dropout", "samples", "seed"]
SMALL = DropoutStudy(ranks=(2, 8), rates=(0.0, 0.3), samples=(8, 40, 100), seeds=2, d=16, steps=30, batch=32, evals=3)


def relative_difference(loop: pd.DataFrame, batched: pd.DataFrame) -> float:
    merged = loop.merge(batched, on=KEYS, suffixes=("_loop", "_batched"))
    assert len(merged) == len(loop)
    worst = 0.0
    for column in ("train_loss", "heldout_loss"):
        diff = (merged[f"{column}_loop"] - merged[f"{column}_batched"]).abs() / merged[f"{column}_loop"].abs()
        worst = max(worst, float(diff.max()))
    return worst


@pytest.mark.parametrize("placement", ["input", "rank"])
def test_batched_equals_the_per_config_loop(placement: str) -> None:
    """Autograd on one config's own tensors against the batched manual backward, every config of a
    grid whose sizes are below, at and above the batch (whole set, sampled minibatches)."""
    study = replace(SMALL, placement=placement)
    batched = run_dropout_study(study, device="cpu")
    loop = dropout_study_loop(study)
    assert len(batched) == len(loop) == 2 * 2 * 3 * 2 * 4
    error = relative_difference(loop, batched)
    print(f"{placement}: largest relative difference {error:.1e}")
    assert error < 1e-5
    # the placements differ: the same seeds give different losses once dropout is on
    other = run_dropout_study(replace(study, placement="rank" if placement == "input" else "input"), device="cpu")
    on = batched["dropout"] > 0
    assert not np.allclose(batched.loc[on, "heldout_loss"], other.loc[on, "heldout_loss"])
    assert np.allclose(batched.loc[~on, "heldout_loss"], other.loc[~on, "heldout_loss"], rtol=1e-6)


def test_a_config_does_not_depend_on_the_grid_around_it() -> None:
    alone = run_dropout_study(replace(SMALL, ranks=(8,), rates=(0.0, 0.3), samples=(40,), seeds=1), device="cpu")
    merged = alone.merge(run_dropout_study(SMALL, device="cpu"), on=KEYS, suffixes=("_a", "_b"))
    assert len(merged) == len(alone)
    assert np.allclose(merged["heldout_loss_a"], merged["heldout_loss_b"], rtol=1e-5)


def test_minibatch_rows_whole_set_or_sampled() -> None:
    import torch

    positions = torch.tensor([[0.0, 0.5, 0.99, 0.25]])  # (S=1, batch=4)
    rows, weight = batch_rows(positions, torch.tensor([2, 4, 10]), 4)
    assert rows[0, 0].tolist() == [0, 1, 1, 1] and weight[0, 0].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert rows[1, 0].tolist() == [0, 1, 2, 3] and weight[1, 0].tolist() == [0.25] * 4
    assert rows[2, 0].tolist() == [0, 5, 9, 2] and weight[2, 0].tolist() == [0.25] * 4


@pytest.fixture(scope="module")
def overfit() -> pd.DataFrame:
    study = DropoutStudy(ranks=(4, 64), rates=(0.0, 0.3), samples=(64, 4096), seeds=2, steps=200)
    return run_dropout_study(study, device="cpu")


def test_high_rank_overfits_small_data_without_dropout(overfit: pd.DataFrame) -> None:
    final = overfit[overfit["step"] == overfit["step"].max()]
    cell = final.groupby(["rank", "samples", "dropout"])[["train_loss", "heldout_loss"]].mean()
    small = cell.loc[(64, 64, 0.0)]
    print(cell)
    # near interpolation: training loss far below the noise (1.0), held-out far above it
    assert small["train_loss"] < 0.3 and small["heldout_loss"] > 3.0
    # ...and dropout, or more data, or a lower rank each cure it
    assert cell.loc[(64, 64, 0.3), "heldout_loss"] < small["heldout_loss"] / 2
    assert cell.loc[(64, 4096, 0.0), "heldout_loss"] < 1.1
    assert cell.loc[(4, 64, 0.0), "heldout_loss"] < small["heldout_loss"] / 2
    # held-out loss at the start: the adapter is zero, so noise (1) plus the target's variance (1)
    start = overfit[overfit["step"] == 0]
    assert np.allclose(start["heldout_loss"], 2.0, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ranks": (0, 4)}, "`ranks`"),
        ({"ranks": (65,)}, "`ranks`"),
        ({"ranks": ()}, "`ranks`"),
        ({"rates": (0.0, 1.0)}, "`rates`"),
        ({"rates": (-0.1,)}, "`rates`"),
        ({"rates": (float("nan"),)}, "`rates`"),
        ({"samples": (0,)}, "`samples`"),
        ({"samples": (MAX_SAMPLES + 1,)}, "`samples`"),
        ({"samples": (10**30,)}, "`samples`"),
        ({"seeds": 0}, "`seeds`"),
        ({"steps": True}, "`steps`"),
        ({"noise": float("inf")}, "`noise`"),
        ({"lr": 0.0}, "`lr`"),
        ({"placement": "output"}, "`placement`"),
        ({"true_rank": 100}, "`true_rank`"),
        ({"ranks": tuple(range(1, 65)), "samples": (MAX_SAMPLES,), "seeds": 16, "steps": 5000}, "GiB"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(change: dict, field: str) -> None:
    with pytest.raises(InputError) as raised:
        run_dropout_study(replace(DEFAULT_STUDY, **change))
    message = str(raised.value)
    assert field in message and "\n" not in message and len(message) < 300, message


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(InputError, match=r"`ranks`.*`rates`.*`noise`"):
        check_study(replace(DEFAULT_STUDY, ranks=(0,), rates=(2.0,), noise=-1.0))


def cells(rows: list[tuple]) -> pd.DataFrame:
    """A synthetic final-step curves frame: (rank, samples, dropout, losses over seeds)."""
    records = [
        {"rank": r, "samples": n, "dropout": p, "seed": s, "step": 10, "heldout_loss": loss}
        for r, n, p, losses in rows
        for s, loss in enumerate(losses)
    ]
    return pd.DataFrame(records)


def test_table_gain_is_clear_only_beyond_the_seed_spread() -> None:
    table = dropout_table(
        cells(
            [
                (16, 32, 0.0, [2.0, 2.2]),
                (16, 32, 0.1, [1.5, 1.7]),  # 0.5 lower, spread 0.2: clear
                (16, 1024, 0.0, [1.00, 1.10]),
                (16, 1024, 0.1, [0.98, 1.08]),  # 0.02 lower, spread 0.1: not clear
            ]
        )
    ).set_index("samples")
    assert table.loc[32, "best_rate"] == 0.1 and table.loc[32, "clear"]
    assert table.loc[32, "gain"] == pytest.approx(0.5 / 2.1) and table.loc[32, "seed_spread"] == pytest.approx(0.2)
    assert table.loc[1024, "best_rate"] == 0.1 and not table.loc[1024, "clear"]
    with pytest.raises(InputError, match="include dropout 0"):
        dropout_table(cells([(16, 32, 0.1, [1.0, 1.1])]))


def verdicts(rows: list[tuple]) -> dict[str, tuple[str, str]]:
    return {f.claim: (f.verdict, f.sentence) for f in dropout_findings(dropout_table(cells(rows)))}


def test_findings_follow_the_numbers() -> None:
    # dropout helps rank 64 at small n only, never rank 2; the gain grows with rank
    found = verdicts(
        [
            (2, 32, 0.0, [1.50, 1.51]),
            (2, 32, 0.2, [1.50, 1.52]),
            (2, 4096, 0.0, [1.00, 1.00]),
            (2, 4096, 0.2, [1.01, 1.01]),
            (64, 32, 0.0, [3.0, 3.1]),
            (64, 32, 0.2, [1.5, 1.6]),
            (64, 4096, 0.0, [1.00, 1.01]),
            (64, 4096, 0.2, [1.00, 1.02]),
        ]
    )
    assert found["smaller data sets benefit from dropout"][0] == "holds"
    assert "1 of 4" in found["smaller data sets benefit from dropout"][1]
    assert "49%" in found["smaller data sets benefit from dropout"][1]  # 1.5 / 3.05
    assert found["large data sets need little or no dropout"][0] == "holds"
    assert "From n = 4,096 on" in found["large data sets need little or no dropout"][1]
    assert found["higher ranks gain more from dropout"][0] == "holds"
    assert found["ranks <= 4 work fine without dropout"][0] == "holds"
    assert found["the rates that help are 0.05-0.1"][0] == "does not hold"  # p = 0.2 is outside


def test_findings_say_when_the_claims_fail() -> None:
    # rank 2 gains clearly at every n, rank 64 never
    found = verdicts(
        [
            (2, 32, 0.0, [2.0, 2.0]),
            (2, 32, 0.1, [1.5, 1.5]),
            (2, 256, 0.0, [2.0, 2.0]),
            (2, 256, 0.1, [2.0, 2.0]),  # no gain in the middle: the claim still fails at 4096
            (2, 4096, 0.0, [2.0, 2.0]),
            (2, 4096, 0.1, [1.8, 1.8]),
            (64, 256, 0.0, [1.0, 1.0]),
            (64, 256, 0.1, [1.0, 1.0]),
            (64, 32, 0.0, [1.0, 1.2]),
            (64, 32, 0.1, [1.0, 1.2]),
            (64, 4096, 0.0, [1.0, 1.0]),
            (64, 4096, 0.1, [1.1, 1.1]),
        ]
    )
    assert found["ranks <= 4 work fine without dropout"][0] == "does not hold"
    assert found["higher ranks gain more from dropout"][0] == "does not hold"
    assert found["large data sets need little or no dropout"][0] == "does not hold"
    assert found["smaller data sets benefit from dropout"][0] == "partly"
    assert found["the rates that help are 0.05-0.1"][0] == "holds"
    none = verdicts([(8, 32, 0.0, [1.0, 1.1]), (8, 32, 0.1, [1.05, 1.15])])
    assert none["smaller data sets benefit from dropout"][0] == "does not hold"
    assert none["higher ranks gain more from dropout"][0] == "untested"


def test_summary_is_deterministic_and_matches_its_table() -> None:
    first, second = study_summary(), study_summary()
    assert first == second
    assert first["study"]["ranks"] == list(DEFAULT_STUDY.ranks) and first["study"]["placement"] == "input"
    assert len(first["cells"]) == len(DEFAULT_STUDY.ranks) * len(DEFAULT_STUDY.samples)
    for cell in first["cells"]:
        assert cell["loss_at_best"] <= cell["loss_at_0"]
        assert cell["gain"] == pytest.approx(1 - cell["loss_at_best"] / cell["loss_at_0"], abs=1e-5)
        assert cell["best_rate"] in DEFAULT_STUDY.rates
    assert [f["claim"] for f in first["findings"]] == [f.claim for f in dropout_findings(pd.DataFrame(first["cells"]))]


def test_high_rank_claim_is_partly_true_when_the_gain_does_not_rise_steadily() -> None:
    # largest gains: rank 2 10%, rank 16 50%, rank 64 20%
    found = verdicts(
        [
            (2, 32, 0.0, [1.0, 1.0]),
            (2, 32, 0.1, [0.9, 0.9]),
            (16, 32, 0.0, [1.0, 1.0]),
            (16, 32, 0.1, [0.5, 0.5]),
            (64, 32, 0.0, [1.0, 1.0]),
            (64, 32, 0.1, [0.8, 0.8]),
        ]
    )
    verdict, sentence = found["higher ranks gain more from dropout"]
    assert verdict == "partly" and "r = 2: 10%, r = 16: 50%, r = 64: 20%" in sentence
