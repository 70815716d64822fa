"""Simulations pinned to closed-form results (Eckart-Young, reduced-rank regression) and to the
article's own loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_core.errors import InputError
from lora_core.simulate import (
    _least_squares,
    _moments,
    alpha_output_stats,
    article_rank_loop,
    dropout_histogram,
    make_rank_task,
    pick_device,
    rank_floors,
    rank_sweep_device,
    reconstruction_error,
    scale_grid,
    simulate_dropout,
    simulate_rank_sweep,
)

SMALL = {"d_in": 32, "d_out": 24, "true_rank": 4, "num_samples": 200, "noise": 0.1, "seed": 3}


def test_batched_sweep_equals_the_articles_loop_with_a_shared_target() -> None:
    ranks = (1, 2, 4, 8)
    ours = simulate_rank_sweep(ranks=ranks, epochs=60, lr=0.01, **SMALL)
    article = article_rank_loop(ranks=ranks, epochs=60, lr=0.01, **SMALL)
    merged = article.merge(ours, on=["rank", "epoch"])
    relative = (merged["loss_x"] - merged["loss_y"]).abs() / merged["loss_x"]
    assert len(merged) == 4 * 60
    assert relative.max() < 1e-4


def test_losses_never_go_below_their_closed_form_floor() -> None:
    sweep = simulate_rank_sweep(ranks=(1, 2, 4, 8), epochs=300, lr=0.05, **SMALL)
    assert (sweep["loss"] >= sweep["floor"] * (1 - 1e-5)).all()


def test_low_ranks_stop_at_their_floor_and_high_ranks_reach_the_noise_floor() -> None:
    sweep = simulate_rank_sweep(ranks=(1, 2, 4, 8), epochs=1500, lr=0.05, **SMALL)
    final = sweep.groupby("rank").agg(loss=("loss", "last"), floor=("floor", "first"))
    noise_floor = final.loc[8, "floor"]
    for rank in (1, 2):  # below the true rank 4: capacity-bound, far above the noise
        assert final.loc[rank, "loss"] == pytest.approx(final.loc[rank, "floor"], rel=0.01)
        assert final.loc[rank, "floor"] > 10 * noise_floor
    for rank in (4, 8):  # at or above it: down to (about) the noise variance
        assert final.loc[rank, "loss"] < 1.2 * 0.1**2
        assert final.loc[rank, "floor"] < 0.1**2


def test_floors_equal_a_brute_force_truncated_svd_of_the_least_squares_fit() -> None:
    _, x, y = make_rank_task(**{k: v for k, v in SMALL.items() if k != "seed"}, seed=SMALL["seed"])
    x64, y64 = x.double(), y.double()
    w = torch.linalg.pinv(x64) @ y64
    fitted = x64 @ w
    u, s, vh = torch.linalg.svd(fitted, full_matrices=False)
    for rank, floor in rank_floors(x, y, (1, 3, 6)).items():
        truncated = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        assert floor == pytest.approx(float(((truncated - y64) ** 2).mean()), rel=1e-9)


def test_floors_with_fewer_samples_than_inputs_are_the_truncated_svd_of_y_itself() -> None:
    # n < d_in: S = X^T X is singular and X W^T can reproduce Y exactly, so the rank-r optimum
    # is Y's own truncated SVD (the jitter path of the least-squares fit)
    _, x, y = make_rank_task(d_in=48, d_out=24, true_rank=4, num_samples=20, noise=0.1, seed=5)
    energy = torch.linalg.svdvals(y.double()) ** 2
    for rank, floor in rank_floors(x, y, (1, 3, 10)).items():
        assert floor == pytest.approx(float(energy[rank:].sum()) / y.numel(), rel=1e-6, abs=1e-9)
    # the residual itself is 0 (X interpolates); uncorrected for the ridge it would be ~4e-11 ||Y||^2
    fit = _least_squares(_moments(x, y))
    assert fit.residual <= 1e-12 * fit.moments.yy


def test_sweep_is_deterministic_and_has_the_documented_columns() -> None:
    first = simulate_rank_sweep(ranks=(2, 4), epochs=5, **SMALL)
    second = simulate_rank_sweep(ranks=(2, 4), epochs=5, **SMALL)
    assert list(first.columns) == ["rank", "epoch", "loss", "floor"]
    assert first.equals(second)


def test_default_signature_matches_the_article_experiment() -> None:
    sweep = simulate_rank_sweep(epochs=2)
    assert sorted(sweep["rank"].unique()) == [2, 4, 8, 16, 32]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"ranks": ()}, "`ranks` must name at least one rank"),
        ({"ranks": (2, 0)}, "`ranks[1]` must be a positive integer, got 0"),
        ({"ranks": (2.5,)}, "`ranks[0]` must be a positive integer, got 2.5"),
        ({"epochs": 0}, "`epochs` must be a positive integer, got 0"),
        ({"epochs": True}, "`epochs` must be a positive integer, got True"),
        ({"lr": 0}, "`lr` must be > 0 and `noise` >= 0"),
        ({"d_in": 0}, "`d_in` must be a positive integer, got 0"),
    ],
)
def test_bad_simulation_input_raises_one_line_naming_the_field(bad, message) -> None:
    with pytest.raises(InputError) as error:
        simulate_rank_sweep(**{**SMALL, "epochs": 2, **bad})
    assert str(error.value) == message


def test_every_bad_simulation_input_is_named_at_once() -> None:
    with pytest.raises(InputError) as error:
        alpha_output_stats(d_in=0, rank=-1)
    assert str(error.value) == "`d_in` must be a positive integer, got 0; `rank` must be a positive integer, got -1"
    with pytest.raises(InputError, match=r"`num_forward` must be .*; `dropout_rates` must be in \[0, 1\)"):
        simulate_dropout(num_forward=0, dropout_rates=(0.0, 1.0))


def test_reconstruction_error_vanishes_from_the_true_rank_on() -> None:
    errors = reconstruction_error(d=64, true_rank=6, max_rank=12).set_index("rank")["error"]
    assert (errors.loc[6:] < 1e-6).all()
    assert (errors.loc[:5] > 0.05).all()
    assert errors.is_monotonic_decreasing


def test_lora_to_original_ratio_is_linear_in_the_scale() -> None:
    stats = alpha_output_stats(d_in=128, d_out=128, rank=8, alphas=(2, 4, 8, 16, 32))
    ratio_per_scale = stats["lora_ratio"] / stats["scale"]
    assert np.allclose(ratio_per_scale, ratio_per_scale.iloc[0], rtol=1e-5)


def test_alpha_stats_reproduce_the_articles_table() -> None:
    # Article Out[8]: rank 16, d=512, alphas 4..64 -> ratios 0.2290, 0.4579, 0.9158, 1.8317, 3.6633
    stats = alpha_output_stats()
    assert stats["lora_ratio"].to_numpy() == pytest.approx([0.2290, 0.4579, 0.9158, 1.8317, 3.6633], abs=5e-5)


def test_rslora_scale_grid() -> None:
    grid = scale_grid([16], [4, 16, 64], use_rslora=True).set_index("rank")["scale"]
    assert grid.tolist() == [8.0, 4.0, 2.0]


def test_dropout_spread_is_zero_without_dropout_and_grows_with_it() -> None:
    stats, samples = simulate_dropout(rank=16, dropout_rates=(0.0, 0.05, 0.1, 0.2, 0.4), num_forward=2000)
    assert stats.loc[0, "std"] == 0.0
    assert stats["std"].is_monotonic_increasing and stats["std"].iloc[-1] > 0
    assert stats["expected_active_rank"].tolist() == pytest.approx([16, 15.2, 14.4, 12.8, 9.6])
    assert len(samples) == 5 * 2000 * 256
    # inverted dropout keeps the mean: the average output matches the no-dropout output
    means = samples.groupby("dropout")["value"].mean()
    assert means.loc[0.2] == pytest.approx(means.loc[0.0], abs=0.02)


def test_dropout_histogram_bins_every_sample_on_shared_edges() -> None:
    _, samples = simulate_dropout(rank=8, dropout_rates=(0.0, 0.3), num_forward=300, d_in=64, d_out=64)
    bins = dropout_histogram(samples, bins=40)
    per_rate = bins.groupby("dropout")
    assert per_rate["count"].sum().tolist() == [300 * 64, 300 * 64]
    assert per_rate["left"].apply(list).loc[0.0] == per_rate["left"].apply(list).loc[0.3]
    assert bins["left"].min() == samples["value"].min() and bins["right"].max() == samples["value"].max()
    # dropout widens the spread: p=0.3 puts samples in bins p=0 leaves empty
    occupied = per_rate.apply(lambda g: int((g["count"] > 0).sum()))
    assert occupied.loc[0.3] > occupied.loc[0.0]
    with pytest.raises(InputError, match="`bins` must be a positive integer, got 0"):
        dropout_histogram(samples, bins=0)


def test_dropout_matches_the_articles_range_at_p0() -> None:
    stats, _ = simulate_dropout()
    assert round(stats.loc[0, "min"], 3) == -1.711 and round(stats.loc[0, "max"], 3) == 2.417  # article Out[19]


def test_device_choice() -> None:
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert pick_device() == expected
    assert pick_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_the_rank_sweep_runs_on_the_cpu_where_the_pick_is_mps(monkeypatch) -> None:
    # MPS has no float64, which the sweep's loss terms need
    cpu = simulate_rank_sweep(epochs=3, device="cpu", **SMALL)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device() == "mps"
    assert rank_sweep_device() == "cpu"
    assert simulate_rank_sweep(epochs=3, **SMALL).equals(cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sweep_matches_cpu() -> None:
    cpu = simulate_rank_sweep(epochs=50, device="cpu", **SMALL)
    gpu = simulate_rank_sweep(epochs=50, device="cuda", **SMALL)
    assert np.allclose(cpu["loss"], gpu["loss"], rtol=1e-3)


@pytest.mark.parametrize("name", ["banana", "cuda:x", "CPU", "cuda:", " cpu", "cpu\x00", "mps:0"])
def test_malformed_device_names_are_refused(name) -> None:
    """`train --device banana` trained on the CPU and reported "completed"."""
    from lora_core.devices import DeviceError

    with pytest.raises(DeviceError, match="`device` must be cpu, cuda, cuda:N or mps"):
        pick_device(name)
