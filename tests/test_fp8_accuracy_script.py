"""``scripts/fp8_accuracy.py`` (imported by path): its errors are those of the quantization it names, on small data."""

import importlib.util
import pathlib

import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "fp8_accuracy.py"
_spec = importlib.util.spec_from_file_location("fp8_accuracy", SCRIPT)
fp8_accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fp8_accuracy)


def test_values_that_e4m3_holds_exactly_lose_nothing_but_the_bf16_rounding():
    # Integers up to 8 in magnitude with a 448 in every row and 128-column group (and every 128 x 128 block): every
    # scale is 1 and every value an e4m3 number, so both FP8 products are the exact product rounded to bf16 once.
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(-8, 9, (32, 256), generator=generator).float()
    weight = torch.randint(-8, 9, (256, 256), generator=generator).float()
    x[:, ::128] = 448
    weight[:, ::128] = 448
    bf16, rowwise, blockwise = fp8_accuracy.errors(x.bfloat16(), weight.bfloat16())
    assert rowwise == blockwise == bf16 < 4e-3


def test_normal_data_costs_e4m3s_rounding_of_both_operands():
    generator = torch.Generator().manual_seed(0)
    x = fp8_accuracy.rows("normal", 64, 512, generator)
    weight = (torch.randn(256, 512, generator=generator) / 512**0.5).bfloat16()
    bf16, rowwise, blockwise = fp8_accuracy.errors(x, weight)
    assert bf16 < 4e-3
    assert 0.02 < rowwise < 0.06 and 0.02 < blockwise < 0.06


def test_outlier_rows_have_a_few_columns_thirty_times_larger():
    generator = torch.Generator().manual_seed(0)
    x = fp8_accuracy.rows("outliers", 4, 1000, generator).float()
    large = x.abs().amax(dim=0) > 10
    assert large.sum() == 5 and x[:, ~large].abs().max() < 10
