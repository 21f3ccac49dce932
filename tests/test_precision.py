"""ieee_float32 switches TF32 off inside the block and restores the caller's flags, also after an error."""

import pytest
import torch

from stablenet.precision import ieee_float32


@pytest.mark.parametrize("matmul,cudnn", [(True, True), (False, True), (True, False)])
def test_flags_off_inside_and_restored(matmul, cudnn):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        with pytest.raises(RuntimeError, match="boom"), ieee_float32():
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
            raise RuntimeError("boom")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (matmul, cudnn)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_sound_arithmetic_switches_fast_math_and_cudnn_off_and_restores():
    from stablenet.precision import sound_arithmetic

    matmul = torch.backends.mkldnn.matmul
    saved, cudnn = matmul.fp32_precision, torch.backends.cudnn.enabled
    try:
        matmul.fp32_precision = "bf16"
        with pytest.raises(RuntimeError, match="boom"), sound_arithmetic():
            assert matmul.fp32_precision == "ieee"
            assert not torch.backends.cudnn.enabled
            assert not torch.backends.cuda.matmul.allow_tf32
            raise RuntimeError("boom")
        assert matmul.fp32_precision == "bf16" and torch.backends.cudnn.enabled == cudnn
    finally:
        matmul.fp32_precision = saved
        torch.backends.cudnn.enabled = cudnn
