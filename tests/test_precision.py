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
