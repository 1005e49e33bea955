"""The task suite: splits, purity, hyperparameter ranges and losses on generated IDX files; Adam on the real ones."""

from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path

import pytest
import torch

from metaopt.cli import main
from metaopt.datasets.fashion_mnist import MAX_LOSS, FashionMNIST8MLP, downsample
from metaopt.datasets.task_suite import (
    BATCH_SIZES,
    CHANNELS,
    CONDITION,
    DIMS,
    FAMILIES,
    HELD_OUT_FAMILIES,
    QUADRATIC_MAX_LOSS,
    TRAIN_FAMILIES,
    WIDTHS,
    ConvTask,
    MLPTask,
    QuadraticTask,
    TaskSuite,
    TaskSuiteOptions,
    build_task_suite,
    held_out_tasks,
    resolve_families,
)
from metaopt.evaluation.tuned_baselines import run_optimizer
from metaopt.options import ConfigError
from metaopt.problems.optimizees import TEST_SEED, Optimizee, OptimizeeFamily
from metaopt.registry import entry
from metaopt.training.config import Section
from tests.datasets.test_mnist import _fake_split, _write_mnist

DATA = os.environ.get("METAOPT_DATA")
needs_data = pytest.mark.skipif(not DATA or not all(Path(DATA, d).is_dir() for d in ("fashion-mnist", "mnist")),
                                reason="set METAOPT_DATA to the folder holding fashion-mnist/ and mnist/ (IDX files)")
N_TRAIN = 2000  # generated training images: 1600 for the losses, 200 for the validation losses


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with generated fashion-mnist/ and mnist/ (the same learnable fake digits)."""
    folder = tmp_path_factory.mktemp("data")
    for name in ("fashion-mnist", "mnist"):
        _write_mnist(folder / name, n_train=N_TRAIN)
    return folder


def _one_of_each(families: tuple[str, ...] = tuple(FAMILIES), root: Path | None = None) -> dict[str, Optimizee]:
    return {name: TaskSuite([name], root).sample(seed) for seed, name in enumerate(families)}


# --- families and their splits ------------------------------------------------------------------------------------


def test_training_and_held_out_families_are_disjoint_and_cover_the_suite() -> None:
    assert not set(TRAIN_FAMILIES) & set(HELD_OUT_FAMILIES)
    assert set(TRAIN_FAMILIES) | set(HELD_OUT_FAMILIES) == set(FAMILIES)
    assert resolve_families("train") == TRAIN_FAMILIES and resolve_families("held-out") == HELD_OUT_FAMILIES
    assert resolve_families(["quadratic", "train"]) == TRAIN_FAMILIES, "repeats are dropped, order kept"
    assert resolve_families(" fashion14-conv,quadratic ") == ("fashion14-conv", "quadratic")
    kinds = {FAMILIES[n].kind for n in HELD_OUT_FAMILIES}
    assert kinds <= {FAMILIES[n].kind for n in TRAIN_FAMILIES}, "every held-out kind of network is met in training"


def test_seeds_go_round_the_families() -> None:
    suite = TaskSuite("held-out")
    assert isinstance(suite, OptimizeeFamily)
    assert [suite.sample(s).family for s in range(8)] == list(HELD_OUT_FAMILIES) * 2


def test_streams_draw_only_from_their_families(root: Path) -> None:
    registered = entry("dataset", "task-suite")
    assert (registered.options, registered.build, registered.problems) == (TaskSuiteOptions, build_task_suite,
                                                                          "optimizees")
    options = Section.from_dict("dataset", {"name": "task-suite", "data_root": str(root)}).options
    for split, families in (("train", TRAIN_FAMILIES), ("val", TRAIN_FAMILIES), ("test", HELD_OUT_FAMILIES)):
        stream = build_task_suite(options, split, seed=3)
        assert {stream.batch(i).family for i in range(40)} == set(families), split
        assert stream.protocol() == {"families": list(TRAIN_FAMILIES), "test_families": list(HELD_OUT_FAMILIES)}
    chosen = options.replace(families="quadratic,mnist8-logistic", test_families="train")
    assert {build_task_suite(chosen, "train", 0).batch(i).family for i in range(6)} == {"quadratic", "mnist8-logistic"}
    assert {build_task_suite(chosen, "test", 0).batch(i).family for i in range(10)} == set(TRAIN_FAMILIES)


def test_held_out_tasks_are_the_test_split(root: Path) -> None:
    tasks = held_out_tasks(20, data_root=root)
    families = [t.family for t in tasks]
    assert families.count("fashion14-conv") == 5 and set(families) == set(HELD_OUT_FAMILIES)
    assert [t.seed for t in tasks] == list(range(TEST_SEED, TEST_SEED + 20))
    test = build_task_suite(TaskSuiteOptions(data_root=str(root)), "test", seed=0)
    assert tasks[7].describe() == test.batch(7).describe() == held_out_tasks(1, start=7)[0].describe()


# --- problems: pure functions of the seed, in their ranges --------------------------------------------------------


def test_problems_are_pure_functions_of_the_seed(root: Path) -> None:
    first, again = TaskSuite(list(FAMILIES), root), TaskSuite(list(FAMILIES), root)
    for seed in range(len(FAMILIES)):
        a, b, other = first.sample(seed), again.sample(seed), first.sample(seed + len(FAMILIES))
        assert a.family == other.family and a.describe() == b.describe()
        pa, pb, po = a.init_params(), b.init_params(), other.init_params()
        assert list(pa) == list(pb) and all(torch.equal(pa[k], pb[k]) for k in pa), a.family
        assert pa.keys() != po.keys() or any(not torch.equal(pa[k], po[k]) for k in pa), a.family
        assert [a.loss(pa, s).item() for s in range(3)] == [b.loss(pb, s).item() for s in range(3)], a.family
        if a.family != "quadratic":
            assert a.validation_loss(pa, 1).item() == b.validation_loss(pb, 1).item()
            assert a.loss(pa, 0).item() != a.loss(pa, 1).item(), "each step its own minibatch"


def test_hyperparameters_stay_in_their_documented_ranges() -> None:
    suite = TaskSuite(list(FAMILIES))
    problems = [suite.sample(seed) for seed in range(100 * len(FAMILIES))]
    quadratics = [p for p in problems if isinstance(p, QuadraticTask)]
    mlps = [p for p in problems if isinstance(p, MLPTask)]
    convs = [p for p in problems if isinstance(p, ConvTask)]
    assert (len(quadratics), len(mlps), len(convs)) == (100, 600, 200)
    assert all(DIMS[0] <= q.dim <= DIMS[1] and CONDITION[0] <= q.condition <= CONDITION[1] for q in quadratics)
    assert len({q.dim for q in quadratics}) > 20 and max(q.condition for q in quadratics) > 300
    for q in quadratics[:10]:
        eigen = torch.linalg.eigvalsh(q.a.double())
        assert (eigen.max() / eigen.min()).item() == pytest.approx(q.condition, rel=1e-3)
        assert q.loss(q.init_params(), 0).item() == pytest.approx(1.0, rel=1e-5), "scaled to loss 1 at θ_0"
    images = mlps + convs
    assert {p.batch for p in images} == set(BATCH_SIZES)
    widths = [w for p in mlps if FAMILIES[p.family].kind == "mlp" for w in p.widths]
    assert all(WIDTHS[0] <= w <= WIDTHS[1] for w in widths) and len(widths) == 400 and len(set(widths)) > 30
    assert all(p.widths == () for p in mlps if FAMILIES[p.family].kind == "logistic")
    assert {len(p.widths) for p in convs} == {1, 2}
    assert all(CHANNELS[0] <= c <= CHANNELS[1] for p in convs for c in p.widths)
    mlp = next(p for p in mlps if p.family == "mnist8-mlp-tanh")
    assert mlp.describe() == {"family": "mnist8-mlp-tanh", "seed": mlp.seed, "dataset": "mnist", "image_size": 8,
                              "hidden": list(mlp.widths), "activation": "tanh", "batch": mlp.batch}


def test_conv_problems_have_rank_4_weights(root: Path) -> None:
    problem = TaskSuite(["fashion14-conv"], root).sample(0)
    params = problem.init_params()
    ranks = {name: p.dim() for name, p in params.items()}
    assert ranks["conv1.weight"] == 4 and params["conv1.weight"].shape[1:] == (1, 3, 3)
    assert ranks["fc1.weight"] == 2 and params["fc1.weight"].shape == (10, problem.widths[-1] * 7 * 7)
    assert problem.describe()["channels"] == list(problem.widths) and problem.size == 14
    assert problem.loss(params, 0).item() == pytest.approx(math.log(10), abs=0.3)


def test_the_fashion8_relu32_problem_is_the_fashion_mnist8_mlp_one(root: Path) -> None:
    mine = MLPTask("fashion8-mlp-relu", 5, 128, (32,), data_root=root)
    reference = FashionMNIST8MLP(root / "fashion-mnist").sample(5)
    pm, pr = mine.init_params(), reference.init_params()
    assert all(torch.equal(pm[k], pr[k]) for k in pr) and list(pm) == list(pr)
    assert [mine.loss(pm, s).item() for s in (0, 13)] == [reference.loss(pr, s).item() for s in (0, 13)]


# --- losses ----------------------------------------------------------------------------------------------------


def test_losses_are_clipped_in_the_outer_loss_only(root: Path) -> None:
    for problem in _one_of_each(("fashion8-mlp-relu", "fashion8-logistic", "fashion14-conv"), root).values():
        params = problem.init_params()
        assert not problem.outer_is_inner
        assert problem.outer_loss(params, 0)[0].item() == problem.loss(params, 0).item()
        big = {k: v * 1000 for k, v in params.items()}
        assert problem.loss(big, 0).item() > MAX_LOSS, problem.family
        assert problem.outer_loss(big, 0)[0].item() == pytest.approx(MAX_LOSS)
        assert problem.validation_loss(big, 0).item() == pytest.approx(MAX_LOSS)
        nan = {k: torch.full_like(v, float("nan")) for k, v in params.items()}
        assert problem.outer_loss(nan, 0)[0].item() == pytest.approx(MAX_LOSS)
    quadratic = TaskSuite(["quadratic"]).sample(0)
    far = {"theta": quadratic.init_params()["theta"] * 10}
    assert quadratic.loss(far, 0).item() > QUADRATIC_MAX_LOSS and quadratic.outer_loss(far, 0)[0].item() == 1.5
    assert quadratic.validation_loss(far, 0) is None, "quadratics have no held-out data"


def test_validation_loss_uses_other_images_than_the_loss(root: Path) -> None:
    problem = TaskSuite(["mnist8-mlp-relu"], root).sample(0)
    fake = downsample(torch.from_numpy(_fake_split(N_TRAIN, 0)[0]).reshape(N_TRAIN, 784))
    train_rows, valid_rows = fake[: N_TRAIN * 8 // 10], fake[N_TRAIN * 8 // 10 : N_TRAIN * 9 // 10]

    def found_in(x: torch.Tensor, rows: torch.Tensor) -> bool:
        return bool((x[:, None] == rows[None]).all(-1).any(-1).all())

    x_train, x_valid = problem.minibatch(0, "train")[0], problem.minibatch(0, "inner-valid")[0]
    assert found_in(x_train, train_rows) and not found_in(x_train, valid_rows)
    assert found_in(x_valid, valid_rows) and not found_in(x_valid, train_rows)
    params = problem.init_params()
    assert problem.validation_loss(params, 0).item() != problem.loss(params, 0).item()


def test_sampling_reads_no_data_and_the_loss_names_the_missing_folder(tmp_path: Path) -> None:
    problem = TaskSuite(["fashion8-mlp-tanh"], tmp_path).sample(0)  # no files: nothing is read yet
    with pytest.raises(FileNotFoundError, match=re.escape(f"not found in {tmp_path / 'fashion-mnist'}")):
        problem.loss(problem.init_params(), 0)


def test_quadratics_move_to_a_device_and_image_problems_move_each_minibatch(root: Path) -> None:
    quadratic = TaskSuite(["quadratic"], dtype=torch.float64).sample(0).to("cpu")
    assert quadratic.init_params()["theta"].dtype == torch.float64 and quadratic.a.device.type == "cpu"
    image = TaskSuite(["mnist8-logistic"], root, dtype=torch.float64).sample(0)
    assert image.to("cpu") is image and image.loss(image.init_params(), 0).dtype == torch.float64


# --- errors -----------------------------------------------------------------------------------------------------


def test_bad_options_name_the_option(root: Path) -> None:
    with pytest.raises(ConfigError, match=r"^option 'families': unknown family 'trian' \(did you mean 'train'\?\); "
                                          r"give 'train', 'held-out' or family names separated by commas, from "
                                          r"quadratic, fashion8-mlp-relu, "):
        Section.from_dict("dataset", {"name": "task-suite", "families": "trian"})
    with pytest.raises(ConfigError, match=r"^option 'test_families': unknown family 'fashion-conv' \(did you mean "
                                          r"'fashion14-conv'\?\)"):
        Section.from_dict("dataset", {"name": "task-suite", "test_families": "held-out,fashion-conv"})
    with pytest.raises(ConfigError, match="option 'families' names no family"):
        TaskSuite([])
    with pytest.raises(ConfigError, match="option 'families' must be str, got"):
        Section.from_dict("dataset", {"name": "task-suite", "families": ["train"]})
    with pytest.raises(ConfigError, match="'hidden' is not an option of dataset 'task-suite'; its options are "
                                          "families, test_families, data_root"):
        Section.from_dict("dataset", {"name": "task-suite", "hidden": [8]})
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        TaskSuite().sample(-1)
    big = MLPTask("fashion8-mlp-relu", 0, 1700, (8,), data_root=root)
    with pytest.raises(ValueError, match=r"problem 0 \(fashion8-mlp-relu\) takes minibatches of 1700 images, more "
                                         r"than the 1600 of part 'train' of .*: put the full dataset there"):
        big.loss(big.init_params(), 0)


def test_command_line_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--algorithm", "mlp-lopt", "--dataset", "task-suite", "--help"])
    text = capsys.readouterr().out
    assert "options of dataset 'task-suite'" in text and all(f in text for f in ("--families", "--test-families"))


# --- the real files ---------------------------------------------------------------------------------------------


@needs_data
def test_real_data_adam_lowers_the_loss_of_every_family() -> None:
    for name, problem in _one_of_each().items():
        lr = 0.1 if name == "quadratic" else 0.03
        losses = run_optimizer(functools.partial(torch.optim.Adam, lr=lr), problem, steps=100)
        initial = 1.0 if name == "quadratic" else math.log(10)
        assert losses[0].item() == pytest.approx(initial, abs=0.25), name
        assert losses[-5:].mean().item() < 0.6 * losses[0].item(), (name, problem.describe(), losses[-5:])
        if name != "quadratic":
            assert problem.validation_loss(problem.init_params(), 0).item() == pytest.approx(math.log(10), abs=0.3)
