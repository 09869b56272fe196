"""The lab: data loaders, training runs, each experiment at a tiny budget, plots and reports.

Checks against independent computations: IDX files written here with NumPy, an SGD step of
torch's optimizer for the landscape probe, evaluation-mode accuracy for batch statistics of a
network without normalization, and the numbers of ``results.json`` in the reports.

Why this file is long: it covers every part of the lab below the experiments' claims (data,
models, training, runner, plans, reports); the claims' directions have their own files.
"""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm.lab import data as lab_data
from batchnorm.lab import experiments, models, training
from batchnorm.lab.catalog import EXPERIMENTS, PLANS
from batchnorm.lab.experiments import BUDGETS, Budget, LabContext
from batchnorm.lab.report import format_value, write_markdown
from batchnorm.lab.session import run_lab
from batchnorm.lab.training import Runner, RunSpec
from batchnorm.modules import BatchNorm1d
from lab_files import write_idx, write_mnist

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MISSING_VARIANTS = {
    "renorm": ("batchnorm.lab.no_such_module", "BatchRenorm1d"),
    "ghost": ("batchnorm.lab.no_such_module", "GhostBatchNorm1d"),
    "bnlstm": ("batchnorm.lab.no_such_module", "BNLSTM"),
}


# ----------------------------------------------------------------------------- IDX and datasets


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    ("dtype", "code"), [(np.uint8, 0x08), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D)]
)
def test_read_idx_round_trip(tmp_path: Path, suffix: str, dtype: type, code: int) -> None:
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    if dtype is np.uint8:
        array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    path = tmp_path / f"values.idx{suffix}"
    write_idx(path, array, code)
    loaded = lab_data.read_idx(path)
    assert loaded.shape == (2, 3, 5)
    assert loaded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(loaded, array)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        lab_data.read_idx(bad_magic)
    short = tmp_path / "short"
    write_idx(short, np.arange(10, dtype=np.uint8), 0x08)
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(ValueError, match="need 10 bytes of data, found 7"):
        lab_data.read_idx(short)
    header_only = tmp_path / "header"
    header_only.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match="header truncated"):
        lab_data.read_idx(header_only)


@pytest.mark.parametrize("compressed", [False, True])
def test_load_mnist_from_idx_files(tmp_path: Path, compressed: bool) -> None:
    write_mnist(tmp_path, compressed)
    dataset = lab_data.load_dataset("mnist", tmp_path)
    assert dataset.x_train.shape == (90, 64)
    assert dataset.x_test.shape == (30, 64)
    assert dataset.image_shape == (8, 8)
    assert dataset.sequence_shape == (8, 8)
    raw = lab_data.read_idx(lab_data.find_mnist_files(tmp_path)["x_train"])
    torch.testing.assert_close(dataset.x_train[3], torch.tensor(raw[3].ravel() / 255.0).float())
    assert float(dataset.x_train.min()) >= 0.0
    assert float(dataset.x_train.max()) <= 1.0


def test_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        lab_data.find_mnist_files(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\[\.gz\]"):
        lab_data.find_mnist_files(tmp_path)
    with pytest.raises(ValueError, match="needs data_dir"):
        lab_data.load_dataset("mnist")
    with pytest.raises(ValueError, match="expected one of digits, mnist1d, mnist"):
        lab_data.load_dataset("cifar")
    write_mnist(tmp_path, compressed=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    write_idx(labels, np.zeros(7, dtype=np.uint8), 0x08)  # 30 test images, 7 labels
    with pytest.raises(ValueError, match="MNIST test: expected images"):
        lab_data.load_mnist(tmp_path)


def test_digits_split_is_deterministic_and_scaled() -> None:
    first, second = lab_data.load_digits_dataset(3), lab_data.load_digits_dataset(3)
    assert torch.equal(first.x_train, second.x_train)
    assert first.x_train.shape == (1437, 64)
    assert first.x_test.shape == (360, 64)
    assert float(first.x_train.max()) == 1.0
    assert float(first.x_train.min()) == 0.0
    assert not torch.equal(first.y_test, lab_data.load_digits_dataset(4).y_test)


@pytest.mark.slow
def test_mnist1d_is_generated_and_standardized() -> None:
    dataset = lab_data.load_dataset("mnist1d")
    assert dataset.x_train.shape == (4000, 40)
    assert dataset.x_test.shape == (1000, 40)
    assert abs(float(dataset.x_train.mean())) < 1e-4
    assert abs(float(dataset.x_train.std()) - 1.0) < 1e-4
    assert set(dataset.y_train.tolist()) == set(range(10))
    assert dataset.image_shape is None


# ----------------------------------------------------------------------------- models


def test_mlp_follows_the_paper() -> None:
    torch.manual_seed(0)
    with_bn, plain = models.mlp(64, 10, "bn"), models.mlp(64, 10, None)
    linears = [m for m in with_bn if isinstance(m, nn.Linear)]
    assert [lin.bias is None for lin in linears] == [True, True, True, False]
    assert all(lin.bias is not None for lin in plain if isinstance(lin, nn.Linear))
    assert sum(isinstance(m, BatchNorm1d) for m in with_bn) == 3
    assert isinstance(with_bn[-2], nn.Sigmoid)
    weights = torch.cat([lin.weight.detach().flatten() for lin in linears])
    assert abs(float(weights.std()) - 0.1) < 0.005


@pytest.mark.parametrize(
    ("activation", "gain"), [("sigmoid", 1.0), ("tanh", 1.0), ("relu", 2**0.5)]
)
def test_deep_mlp_with_scaled_init(activation: str, gain: float) -> None:
    torch.manual_seed(0)
    model = models.mlp(64, 10, "bn", hidden=400, depth=4, init_std=None, activation=activation)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert len(linears) == 5
    assert isinstance(model[-2], type(models.ACTIVATIONS[activation][0]()))
    for linear in linears[:-1]:  # std = gain / √fan_in (He or LeCun)
        expected = gain / linear.in_features**0.5
        assert abs(float(linear.weight.detach().std()) / expected - 1) < 0.03, activation
    assert abs(float(linears[-1].weight.detach().std()) * 20 - 1) < 0.05  # output: 1/√400
    layer_norm = models.mlp(64, 10, "ln")
    assert sum(isinstance(m, nn.LayerNorm) for m in layer_norm) == 3
    biases = [lin.bias is None for lin in layer_norm if isinstance(lin, nn.Linear)]
    assert biases == [True, True, True, False]  # β of each LayerNorm takes the bias's place


def test_model_errors() -> None:
    with pytest.raises(ValueError, match="norm: expected one of"):
        models.norm_1d("layer", 4)
    with pytest.raises(ValueError, match="activation: expected one of sigmoid, tanh, relu"):
        models.mlp(64, 10, activation="gelu")
    with pytest.raises(ValueError, match="cell: expected 'lstm' or 'bnlstm'"):
        models.SequenceClassifier((8, 8), 10, 4, "gru")
    digits = lab_data.load_digits_dataset()
    with pytest.raises(ValueError, match="needs image data"):
        training.build_model(
            RunSpec("cnn", "bn", 0.1, 1, 4, 0, 1), dataclasses.replace(digits, image_shape=None)
        )
    with pytest.raises(ValueError, match="model: expected"):
        training.build_model(RunSpec("rbm", None, 0.1, 1, 4, 0, 1), digits)
    with pytest.raises(ValueError, match="optimizer: expected"):
        training.train(RunSpec("mlp", None, 0.1, 1, 4, 0, 1, optimizer="lbfgs"), digits)


def test_missing_variant_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "VARIANT_LAYERS", MISSING_VARIANTS)
    with pytest.raises(models.VariantUnavailable, match=r"no_such_module\.BatchRenorm1d"):
        models.norm_1d("renorm", 4)
    monkeypatch.setattr(models, "VARIANT_LAYERS", {"bnlstm": ("batchnorm", "NoSuchLayer")})
    with pytest.raises(models.VariantUnavailable, match=r"batchnorm\.NoSuchLayer"):
        models.SequenceClassifier((8, 8), 10, 4, "bnlstm")


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def digits() -> lab_data.Dataset:
    return lab_data.load_digits_dataset()


def test_train_is_deterministic(digits: lab_data.Dataset) -> None:
    spec = RunSpec("mlp", "bn", 0.5, 30, 60, 7, 10)
    with training.single_thread():
        first, second = training.train(spec, digits), training.train(spec, digits)
    assert first == second
    assert first["steps"] == [0, 10, 20, 30]
    assert len(first["percentiles"]) == 4
    assert all(p15 <= p50 <= p85 for p15, p50, p85 in first["percentiles"])


def test_train_stops_on_divergence(digits: lab_data.Dataset) -> None:
    result = training.train(RunSpec("mlp", None, float("inf"), 50, 60, 0, 10), digits)
    assert result["diverged"] is True
    assert result["steps_done"] < 50


def test_non_iid_batches_hold_one_class(digits: lab_data.Dataset) -> None:
    sample = training._BatchSampler(
        digits.y_train, 10, RunSpec("mlp", "bn", 0.1, 1, 4, 0, 1, non_iid=True)
    )
    for _ in range(20):
        assert len(set(digits.y_train[sample()].tolist())) == 1


def test_landscape_probe_matches_an_sgd_step(digits: lab_data.Dataset) -> None:
    torch.manual_seed(0)
    model = models.mlp(64, 10, "bn")
    x, y = digits.x_train[:60], digits.y_train[:60]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    probe = training.landscape_probe(model, x, y, (0.7,))
    for key, value in model.state_dict().items():  # parameters and running stats untouched
        assert torch.equal(value, state[key]), key
    stepped = models.mlp(64, 10, "bn")
    stepped.load_state_dict(state)
    optimizer = torch.optim.SGD(stepped.parameters(), lr=0.7)
    loss = nn.functional.cross_entropy(stepped(x), y)
    torch.autograd.backward(loss)
    optimizer.step()
    moved = nn.functional.cross_entropy(stepped(x), y).item()
    assert probe["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert [probe["loss_min"], probe["loss_max"]] == pytest.approx(
        sorted([loss.item(), moved]), rel=1e-5
    )
    assert probe["loss_range"] == pytest.approx(abs(moved - loss.item()), rel=1e-4)
    assert probe["grad_change"] > 0
    assert probe["beta"] > 0
    still = training.landscape_probe(model, x, y, ())
    assert still["loss_range"] == 0
    assert still["grad_change"] == 0


def test_batch_stats_accuracy(digits: lab_data.Dataset) -> None:
    torch.manual_seed(0)
    plain = models.mlp(64, 10, None).eval()
    x, y = digits.x_test[:100], digits.y_test[:100]
    with torch.no_grad():
        expected = (plain(x).argmax(1) == y).float().mean().item()
    assert training.batch_stats_accuracy(plain, x, y, 4, one_class=False) == pytest.approx(expected)
    normalized = models.mlp(64, 10, "bn").eval()
    before = {k: v.clone() for k, v in normalized.state_dict().items()}
    accuracy = training.batch_stats_accuracy(normalized, x, y, 4, one_class=True)
    assert 0.0 <= accuracy <= 1.0
    assert all(torch.equal(v, before[k]) for k, v in normalized.state_dict().items())
    assert not normalized.training


@pytest.mark.slow
def test_runner_workers_match_in_process() -> None:
    specs = [RunSpec("mlp", norm, 0.5, 20, 60, 1, 10) for norm in (None, "bn")]
    serial = Runner("digits", jobs=1, progress=False)
    parallel = Runner("digits", jobs=2, progress=False)
    try:
        parallel.prefetch(specs[1:])  # started now, collected by run() below
        assert set(parallel._pending) == {specs[1]}
        assert parallel.run(specs, "parallel") == serial.run(specs, "serial")
        assert parallel._pending == {}
        assert parallel.run(specs[:1], "cached")[0] is parallel.run(specs, "again")[0]
        parallel.prefetch(specs)  # nothing left to start
        assert parallel._pending == {}
    finally:
        parallel.close()
    serial.prefetch(specs)  # one job: runs stay in this process, nothing is started
    assert serial._pending == {}
    assert serial._pool is None
    with pytest.raises(ValueError, match="jobs: expected a positive int"):
        Runner("digits", jobs=0)


# ----------------------------------------------------------------------------- experiments


def tiny_context(seeds: tuple[int, ...] = (0,), **changes: int) -> LabContext:
    budget = dataclasses.replace(BUDGETS["quick"], **changes)
    return LabContext(Runner("digits", progress=False), seeds, budget)


def test_convergence_bn_is_ahead_at_mid_training() -> None:
    """With fixed seeds, BN is far ahead of the plain sigmoid network after 100 of 200 steps."""
    context = tiny_context((0, 1), mlp_steps=200, eval_every=25)
    result = experiments.convergence(context)
    summary = result.summary
    assert summary["mid-training step"] == 100
    bn, plain = (summary[f"test accuracy at mid-training, {k}"] for k in ("BN", "no BN"))
    assert isinstance(bn, float)
    assert isinstance(plain, float)
    assert bn > 0.85, summary
    assert bn - plain > 0.3, summary
    assert summary["steps to target, BN"] < summary["steps to target, no BN"]  # type: ignore[operator]
    assert len(result.curves["BN"]["mean"]) == 9


@pytest.fixture(scope="module")
def quick_lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict[str, list]]:
    """Every experiment at the quick budget, with the variants made unavailable; also records
    the runs handed to ``Runner.prefetch`` and those each ``Runner.run`` call asked for."""
    folder = tmp_path_factory.mktemp("lab")
    calls: dict[str, list] = {"prefetch": [], "run": []}
    prefetch, run = Runner.prefetch, Runner.run

    def recording_prefetch(self: Runner, specs: list[RunSpec]) -> None:
        calls["prefetch"].append(list(specs))
        prefetch(self, specs)

    def recording_run(self: Runner, specs: list[RunSpec], description: str) -> list:
        calls["run"].append((description, list(specs)))
        return run(self, specs, description)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "VARIANT_LAYERS", MISSING_VARIANTS)
        patch.setattr(Runner, "prefetch", recording_prefetch)
        patch.setattr(Runner, "run", recording_run)
        output = run_lab(budget="quick", out=folder, progress=True)
    assert output.report == folder / "report.html"
    return folder, json.loads((folder / "results.json").read_text()), calls


@pytest.mark.slow
def test_every_experiment_writes_a_plot(quick_lab: tuple[Path, dict, dict]) -> None:
    folder, results, _ = quick_lab
    assert list(results["experiments"]) == list(EXPERIMENTS)
    for key, experiment in results["experiments"].items():
        assert experiment["figure"] == f"{key}.png"
        image = (folder / experiment["figure"]).read_bytes()
        assert image.startswith(PNG_MAGIC), key
        assert len(image) > 10_000, key
        assert experiment["effect"], key
        assert experiment["summary"], key


def markdown_cell(text: str) -> str:
    """A Markdown table cell: a pipe is escaped (independent of the report's own helper)."""
    return "".join("\\|" if character == "|" else character for character in text)


def test_pipes_do_not_break_the_markdown_tables(tmp_path: Path) -> None:
    result = experiments.ExperimentResult(
        "demo", "A | B", "claim", "source", effect="max |Δ| = 0", summary={"|x|": "a|b"}
    )
    write_markdown(tmp_path / "report.md", [result], {"seeds": 1})
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line[:1] == "|"]
    for row in rows:  # every row of both tables keeps its number of cells
        cells = row.replace("\\|", "").count("|") - 1
        assert cells in (4, 2), row
    assert "| 1 | A \\| B | source | max \\|Δ\\| = 0 |" in rows
    assert "| \\|x\\| | a\\|b |" in rows


@pytest.mark.slow
def test_reports_hold_the_numbers_of_results_json(quick_lab: tuple[Path, dict, dict]) -> None:
    folder, results, _ = quick_lab
    markdown = (folder / "report.md").read_text()
    page = (folder / "report.html").read_text()
    for key, experiment in results["experiments"].items():
        assert f"({key}.png)" in markdown
        assert f'src="{key}.png"' in page
        assert experiment["claim"] in markdown
        for name, value in experiment["summary"].items():
            row = f"| {markdown_cell(name)} | {markdown_cell(format_value(value))} |"
            assert row in markdown, (key, name)
            assert f'class="number">{format_value(value)}<' in page, (key, name)
        if experiment["text"]:
            assert f"```text\n{experiment['text']}\n```" in markdown, key
            assert f"<pre>{html.escape(experiment['text'])}</pre>" in page, key
    assert results["experiments"]["worked-example"]["text"]
    assert results["meta"]["budget"] == "quick"
    assert results["meta"]["seeds"] == 1


@pytest.mark.slow
def test_missing_variants_are_skipped_with_a_note(quick_lab: tuple[Path, dict, dict]) -> None:
    folder, results, _ = quick_lab
    small, recurrent = results["experiments"]["small-batches"], results["experiments"]["cnn-rnn"]
    assert any("Batch Renorm, one class skipped" in note for note in small["notes"])
    assert any("Ghost BN, one class skipped" in note for note in small["notes"])
    assert set(small["curves"]) == {"BN, iid", "BN, one class"}
    assert any("RNN part skipped" in note and "BNLSTM" in note for note in recurrent["notes"])
    assert set(recurrent["curves"]) == {"CNN", "CNN + BatchNorm2d"}
    assert "RNN part skipped" in (folder / "report.md").read_text()


@pytest.mark.slow
def test_the_session_starts_every_run_it_needs_first(quick_lab: tuple[Path, dict, dict]) -> None:
    """The plans list every run the experiments then ask for, and only those."""
    _, _, calls = quick_lab
    (planned,) = calls["prefetch"][:1]
    asked = [spec for _, specs in calls["run"] for spec in specs]
    assert set(asked) == set(planned)
    assert set(PLANS) == set(EXPERIMENTS)
    descriptions = [description for description, _ in calls["run"]]
    assert "7 gradient flow" in descriptions
    assert "8 which axes" in descriptions


def test_plans_match_what_each_experiment_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each experiment alone asks for exactly the runs its plan lists (tiny budgets)."""
    monkeypatch.setattr(models, "VARIANT_LAYERS", MISSING_VARIANTS)
    context = tiny_context(
        mlp_steps=2, eval_every=1, cnn_steps=1, rnn_steps=1, small_batch_steps=2,
        probe_steps=2, probe_every=1, gradient_steps=1, axes_steps=1,
    )  # fmt: skip
    asked: list[RunSpec] = []
    run = context.runner.run

    def recording_run(specs: list[RunSpec], description: str) -> list:
        asked.extend(specs)
        return run(specs, description)

    monkeypatch.setattr(context.runner, "run", recording_run)
    for name, experiment in EXPERIMENTS.items():
        asked.clear()
        experiment(context)
        assert asked == PLANS[name](context), name


class StandInRenorm(BatchNorm1d):
    """Stands in for BatchRenorm1d: takes its schedule, normalizes like BN."""

    def __init__(self, num_features: int, **schedule: int) -> None:
        super().__init__(num_features)
        assert set(schedule) == {"warmup_steps", "d_max_steps", "r_max_steps"}
        assert 1 <= schedule["warmup_steps"] < schedule["d_max_steps"] < schedule["r_max_steps"]


class StandInGhost(BatchNorm1d):
    """Stands in for GhostBatchNorm1d: takes its extra argument, normalizes the whole batch."""

    def __init__(self, num_features: int, virtual_batch_size: int) -> None:
        super().__init__(num_features)
        self.virtual_batch_size = virtual_batch_size


class StandInBNLSTM(nn.LSTM):
    """Stands in for the BN-LSTM: same call convention as ``nn.LSTM``, plus ``max_steps``."""

    def __init__(self, input_size: int, hidden_size: int, max_steps: int) -> None:
        super().__init__(input_size, hidden_size)
        assert max_steps == 64


def test_variant_parts_run_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        models,
        "VARIANT_LAYERS",
        {
            "renorm": (__name__, "StandInRenorm"),
            "ghost": (__name__, "StandInGhost"),
            "bnlstm": (__name__, "StandInBNLSTM"),
        },
    )
    context = tiny_context(small_batch_steps=40, rnn_steps=4, cnn_steps=4)
    small = experiments.small_batches(context)
    assert small.notes == []
    assert set(small.curves) == {label for label, _, _ in experiments.SMALL_BATCH_CONFIGS}
    assert 0.0 <= small.summary["batch statistics, mixed test batches, Ghost BN, one class"] <= 1  # type: ignore[operator]
    recurrent = experiments.cnn_rnn(context)
    assert recurrent.notes == []
    assert {"LSTM", "BN-LSTM"} <= set(recurrent.curves)
    assert recurrent.curves["LSTM"]["steps"] == [0, 1, 2, 3, 4]


def test_cnn_is_skipped_without_images() -> None:
    context = tiny_context()
    context.runner.dataset = dataclasses.replace(context.runner.dataset, image_shape=None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "VARIANT_LAYERS", MISSING_VARIANTS)
        result = experiments.cnn_rnn(context)
    assert result.curves == {}
    assert result.effect == "skipped (see notes)"
    assert any("CNN part skipped: the digits data are not images" in n for n in result.notes)


def test_run_lab_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown 'speed'"):
        run_lab(["speed"], out=tmp_path)
    with pytest.raises(ValueError, match="budget: expected one of"):
        run_lab(budget="huge", out=tmp_path)
    with pytest.raises(ValueError, match="seeds: expected a positive int"):
        run_lab(seeds=0, out=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_run_lab_on_mnist_files(tmp_path: Path) -> None:
    write_mnist(tmp_path, compressed=True)
    output = run_lab(
        ["convergence"],
        data="mnist",
        data_dir=tmp_path,
        budget="quick",
        out=tmp_path / "out",
        progress=False,
    )
    (result,) = output.results
    assert (tmp_path / "out" / "convergence.png").read_bytes().startswith(PNG_MAGIC)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["meta"]["data"] == "mnist"
    assert result.summary["final test accuracy, BN"] is not None


def test_budgets_grow() -> None:
    fields = [f.name for f in dataclasses.fields(Budget) if f.name not in ("name",)]
    for field in fields:
        quick, default, full = (getattr(BUDGETS[b], field) for b in ("quick", "default", "full"))
        assert quick <= default <= full or field == "eval_every", field
