"""moe_gemm.testing: the typed plan override (validation, nesting, restore), without a GPU."""

import importlib.util
import pathlib
import threading
import types

import pytest

from moe_gemm import testing
from moe_gemm.testing import PlanOverride, current_plan_override, plan_override

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_instantiations", ROOT / "csrc" / "generate_instantiations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeExtension(types.SimpleNamespace):
    """Stands in for moe_gemm._C: records what set_plan_override receives."""

    def __init__(self, names=("128x256", "16x128s")):
        super().__init__(calls=[], names=tuple(names))

    def tile_config_names(self):
        return self.names

    def set_plan_override(self, tile_config, split_k, dynamic_schedule):
        self.calls.append((tile_config, split_k, dynamic_schedule))


@pytest.fixture
def no_extension(monkeypatch):
    monkeypatch.setattr(testing, "_extension", lambda: None)


@pytest.fixture
def fake_extension(monkeypatch):
    fake = FakeExtension()
    monkeypatch.setattr(testing, "_extension", lambda: fake)
    return fake


def test_the_static_names_are_the_cpp_table():
    generator = load_generator()
    assert testing.TILE_CONFIGS == ("auto", *generator.tile_configs())


def test_the_instantiations_are_generated_from_the_table():
    # One forward .cu per dtype x layout x configuration of the table, a gathering one more for each configuration
    # whose gather_a column is true, four gated ones (interleaved or concatenated, gathering or not) for each whose
    # gated column is true, four weight-gradient ones and, for gradients in the input dtype, one more per gathered
    # operand (L or R), the FP8 kernels of the generator's list, nothing else.
    generator = load_generator()
    expected = {f"sm90_moe_gemm_{dtype}_{layout}_{config}.cu"
                for dtype in generator.DTYPES for layout in generator.WEIGHT_LAYOUTS for config in generator.tile_configs()}
    expected |= {f"sm90_moe_gemm_{dtype}_{layout}_{config}_gather.cu" for dtype in generator.DTYPES
                 for layout in generator.WEIGHT_LAYOUTS for config in generator.gather_tile_configs()}
    expected |= {f"sm90_moe_gemm_{dtype}_{layout}_{config}_gated_{gate_up}{gather}.cu" for dtype in generator.DTYPES
                 for layout in generator.WEIGHT_LAYOUTS for config in generator.gated_tile_configs()
                 for gate_up in generator.GATE_UP_LAYOUTS for gather in ("", "_gather")}
    expected |= {f"sm90_moe_wgrad_{dtype}_{out}.cu" for dtype in generator.DTYPES for out in generator.WGRAD_OUTPUTS}
    expected |= {f"sm90_moe_wgrad_{dtype}_same_gather_{operand}.cu" for dtype in generator.DTYPES
                 for operand in generator.WGRAD_GATHERS}
    expected |= {f"sm90_moe_gemm_fp8_{scales}_bf16_{tile}.cu" for scales, tile in generator.FP8_KERNELS}
    assert {path.name for path in (ROOT / "csrc" / "instantiations").glob("*.cu")} == expected


def test_defaults_leave_everything_to_the_heuristics():
    assert PlanOverride() == PlanOverride(tile_config="auto", split_k=0, dynamic_schedule=None)
    assert current_plan_override() == PlanOverride()


@pytest.mark.parametrize("fields, match", [
    ({"tile_config": "128x128pp"}, "tile_config must be one of"),
    ({"tile_config": "64x64"}, "tile_config must be one of"),
    ({"tile_config": None}, "tile_config must be one of"),
    ({"split_k": -1}, "split_k must be an int >= 0"),
    ({"split_k": 2.0}, "split_k must be an int >= 0"),
    ({"split_k": True}, "split_k must be an int >= 0"),
    ({"dynamic_schedule": 1}, "dynamic_schedule must be None, True or False"),
])
def test_invalid_values_are_refused(fields, match, no_extension):
    with pytest.raises(ValueError, match=match):
        PlanOverride(**fields)
    with pytest.raises(ValueError, match=match):
        with plan_override(**fields):
            pass
    assert current_plan_override() == PlanOverride()


@pytest.mark.parametrize("name", testing.TILE_CONFIGS)
def test_every_configuration_of_the_table_is_accepted(name, no_extension):
    with plan_override(tile_config=name) as override:
        assert override.tile_config == name


def test_without_the_extension_it_is_a_no_op_that_still_tracks_the_value(no_extension):
    assert testing.tile_configs() == testing.TILE_CONFIGS
    with plan_override(tile_config="32x128s", split_k=3, dynamic_schedule=False) as override:
        assert current_plan_override() is override
    assert current_plan_override() == PlanOverride()


def test_nesting_replaces_and_restores(fake_extension):
    with plan_override(tile_config="16x128s", split_k=2):
        with plan_override(PlanOverride(tile_config="128x256"), dynamic_schedule=True):
            assert current_plan_override() == PlanOverride("128x256", 0, True)
        assert current_plan_override() == PlanOverride("16x128s", 2, None)
    assert current_plan_override() == PlanOverride()
    assert fake_extension.calls == [("16x128s", 2, -1), ("128x256", 0, 1), ("16x128s", 2, -1), ("auto", 0, -1)]


def test_restored_after_an_exception(fake_extension):
    with pytest.raises(KeyError):
        with plan_override(tile_config="128x256", dynamic_schedule=False):
            raise KeyError("inside")
    assert current_plan_override() == PlanOverride()
    assert fake_extension.calls == [("128x256", 0, 0), ("auto", 0, -1)]


def test_names_come_from_the_extension(fake_extension):
    assert testing.tile_configs() == ("auto", "128x256", "16x128s")
    with pytest.raises(ValueError, match="tile_config must be one of auto, 128x256, 16x128s"):
        PlanOverride(tile_config="128x128")
    assert fake_extension.calls == []  # refused before reaching the extension


def test_an_extension_without_overrides_is_an_error(monkeypatch):
    monkeypatch.setattr(testing, "_extension", lambda: types.SimpleNamespace())
    with pytest.raises(RuntimeError, match="rebuild the extension"):
        with plan_override(split_k=1):
            pass
    assert current_plan_override() == PlanOverride()


def test_other_threads_see_the_override(no_extension):
    seen = []
    with plan_override(tile_config="128x128", split_k=1):
        thread = threading.Thread(target=lambda: seen.append(current_plan_override()))
        thread.start()
        thread.join()
    assert seen == [PlanOverride("128x128", 1, None)]


def test_an_override_must_be_a_plan_override(no_extension):
    with pytest.raises(TypeError, match="PlanOverride"):
        with plan_override({"tile_config": "128x128"}):
            pass


def table_rows():
    """The C++ table's rows (csrc/moe_tile_configs.h) as {name: (split_k column, gather_a column)}."""
    import re
    row = re.compile(r'^\s*X\(k\w+,\s*"([^"]+)",(?:\s*\d+,){5}\s*(?:true|false),\s*(true|false),\s*(true|false),',
                     re.MULTILINE)
    table = (ROOT / "csrc" / "moe_tile_configs.h").read_text()
    rows = {name: (split, gather) for name, split, gather in row.findall(table)}
    assert set(rows) == set(testing.TILE_CONFIGS[1:])
    return rows


def test_the_split_k_names_are_the_cpp_tables_split_k_column():
    assert set(testing.SPLIT_K_TILE_CONFIGS) == {name for name, (split, _) in table_rows().items() if split == "true"}


def test_the_gated_names_are_the_cpp_tables_gated_column():
    import re
    row = re.compile(r'^\s*X\(k\w+,\s*"([^"]+)",(?:\s*\d+,){5}(?:\s*(?:true|false),){3}\s*(true|false),',
                     re.MULTILINE)
    table = (ROOT / "csrc" / "moe_tile_configs.h").read_text()
    gated = {name for name, column in row.findall(table) if column == "true"}
    assert set(testing.GATED_TILE_CONFIGS) == gated
    assert set(testing.GATED_TILE_CONFIGS) == set(load_generator().gated_tile_configs())
    # The gated kernels gather too (one instantiation each way).
    assert set(testing.GATED_TILE_CONFIGS) <= set(testing.GATHER_TILE_CONFIGS)


def test_the_gather_names_are_the_cpp_tables_gather_a_column():
    assert set(testing.GATHER_TILE_CONFIGS) == {name for name, (_, gather) in table_rows().items() if gather == "true"}
    assert set(testing.GATHER_TILE_CONFIGS) == set(load_generator().gather_tile_configs())


@pytest.mark.parametrize("name", [name for name in testing.TILE_CONFIGS if name not in testing.SPLIT_K_TILE_CONFIGS])
def test_a_split_for_a_configuration_without_split_k_is_refused(name, no_extension):
    for split_k in (0, 1):
        PlanOverride(tile_config=name, split_k=split_k)
    if name == "auto":
        PlanOverride(tile_config=name, split_k=4)  # the heuristic's configuration splits if it can
        return
    with pytest.raises(ValueError, match="has no split-K kernel"):
        with plan_override(tile_config=name, split_k=4):
            pass
    assert current_plan_override() == PlanOverride()


@pytest.mark.parametrize("name", testing.SPLIT_K_TILE_CONFIGS)
def test_a_split_for_a_split_k_configuration_is_accepted(name, no_extension):
    with plan_override(tile_config=name, split_k=4) as override:
        assert override.split_k == 4


def test_blocks_ending_out_of_order_across_threads_raise_and_leave_no_override(fake_extension):
    # Thread A enters 128x256, thread B enters 16x128s, A ends first: A's end is an error, B's override stays in
    # effect, and after B ends the default is back (not A's override, which the old restore-what-I-saw left).
    a_entered, b_entered, a_done = threading.Event(), threading.Event(), threading.Event()
    errors = {}

    def block_a():
        try:
            with plan_override(tile_config="128x256"):
                a_entered.set()
                b_entered.wait()
        except RuntimeError as error:
            errors["a"] = error
        finally:
            a_done.set()

    def block_b():
        a_entered.wait()
        with plan_override(tile_config="16x128s"):
            b_entered.set()
            a_done.wait()
            errors["b_inside"] = current_plan_override()

    threads = [threading.Thread(target=block_a), threading.Thread(target=block_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert "must nest" in str(errors["a"])
    assert errors["b_inside"] == PlanOverride("16x128s")
    assert current_plan_override() == PlanOverride()
    assert fake_extension.calls[-1] == ("auto", 0, -1)
    assert testing._stack == []


def test_resolved_plan_needs_the_extension(no_extension):
    with pytest.raises(RuntimeError, match="CUDA extension"):
        testing.resolved_plan(2, 4096, 14336, 8)


def test_resolved_plan_asks_the_extension(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(plan_grouped_gemm=lambda *sizes: calls.append(sizes) or ("16x128s", 2, 0))
    monkeypatch.setattr(testing, "_extension", lambda: fake)
    assert testing.resolved_plan(2, 4096, 14336, 8) == ("16x128s", 2, False)
    assert testing.resolved_plan(2, 4096, 14336, 8, gather=True) == ("16x128s", 2, False)
    assert calls == [(2, 4096, 14336, 8), (2, 4096, 14336, 8, True)]
