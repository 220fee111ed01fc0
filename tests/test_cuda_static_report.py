"""benchmarks/cuda_static_report.py's reading of SASS (the figures in benchmarks/NOTES.md come from it):
the main loop of a tensor-core kernel, and the largest innermost loop of one without HMMA."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("cuda_static_report", ROOT / "benchmarks" / "cuda_static_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _function(name, body):
    lines = [f"        /*{16 * i:04x}*/                   {text} ;" for i, text in enumerate(body)]
    return f"\n\tFunction : {name}\n" + "\n".join(lines) + "\n"


def test_main_loop_and_innermost_loops():
    mma = _function("k_mma", ["MOV R1, R2", "LDSM.16.M88.4 R4, [R0]", "HMMA.16816.F32.BF16 R8, R4, R6, R8",
                              "HMMA.16816.F32.BF16 R12, R4, R7, R12", "IADD3 R0, R0, 0x1, RZ", "BRA 0x10",
                              "EXIT"])
    plain = _function("k_plain", ["MOV R1, R2",
                                  "LDG.E R3, [R4]", "FADD R3, R3, R3", "BRA 0x10",  # inner loop: 3 instructions
                                  "IADD3 R5, R5, 0x1, RZ", "BRA 0x10",  # outer loop around it: not innermost
                                  "LDG.E R6, [R7]", "FMUL R6, R6, R6", "STG.E [R7], R6", "BRA 0x60",  # inner: 4
                                  "EXIT"])
    got = _report()._sass_per_mma(mma + plain)
    assert got["k_mma"] == (2, 5)  # LDSM .. BRA: 5 instructions for 2 HMMA
    assert got["k_plain"] == (0, 4)


def test_objects_are_found_per_source_in_a_cmake_build(tmp_path):
    """--objects (check_cuda.sh shares its CMake build with the report): each source's object file, by its path
    under csrc, and a clear stop where the build lacks one."""
    mod = _report()
    src = mod.ROOT / "csrc" / "kernels" / "conv_forward.cu"
    obj = tmp_path / "CMakeFiles" / "fused_resnet_kernels.dir" / "csrc" / "kernels" / "conv_forward.cu.o"
    obj.parent.mkdir(parents=True)
    obj.write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "conv_forward.cu.o").write_bytes(b"")  # same name, not csrc/kernels/: not taken
    assert mod._object_for(tmp_path, src) == obj
    with pytest.raises(SystemExit, match="0 object files for csrc/kernels/conv_dgrad.cu.o"):
        mod._object_for(tmp_path, mod.ROOT / "csrc" / "kernels" / "conv_dgrad.cu")
