"""pndm_fast.ops.lincomb: torch and C++ paths against float64 truth, errors, torch.compile (triton: test_ops_triton.py).

Three-way check: an implementation's max error against float64 math on the same inputs must be at
most twice the error of a float32 evaluation written out in this file (not the package's torch twin), plus one
fp32 ulp of the result's scale, and never more than the float32 error bound of the sum itself.
"""

import os

import numpy as np
import pytest
import torch

from pndm_fast import ops

# (1,) a single element; 3x3x17x19 = 2907 and 1100: not multiples of triton's 1024 BLOCK nor of the C++ 512
# chunk, several blocks; 3x3x65x67 = 39195: above the C++ OpenMP threshold of 32768, odd tail.
SHAPES = [(1,), (1100,), (3, 3, 17, 19), (2, 3, 32, 32), (3, 3, 65, 67)]
OPERAND_DTYPES = {
    "f32": [torch.float32] * 5,
    "bf16": [torch.bfloat16] * 5,
    "f16": [torch.float16] * 5,
    "mixed": [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.float32],
}
# keep_x, out2 (None, or keep_x2), out written in place over x
FLAGS = [(True, None, False), (False, None, False), (True, False, False), (False, True, False),
         (True, None, True), (True, False, True)]


def make_case(shape, k, dtypes, gen):
    """x, operands, weights shaped like a PNDM step: w[0] = A-1 tiny, the rest O(1)."""
    x = torch.randn(shape, generator=gen)
    operands = [torch.randn(shape, generator=gen).to(dtypes[j]) for j in range(k)]
    w = [-1e-3 * float(torch.rand((), generator=gen))] + torch.randn(k, generator=gen, dtype=torch.float64).tolist()
    w2 = [0.3 * float(torch.randn((), generator=gen))] + torch.randn(k, generator=gen, dtype=torch.float64).tolist()
    return x, operands, w, w2


def truth(x, operands, w, keep_x):
    """float64 math on the exact same inputs (bf16/fp16 -> float64 is exact)."""
    x64 = x.double()
    delta = w[0] * x64 + sum(wj * v.double() for wj, v in zip(w[1:], operands))
    scale = (x64.abs() * (abs(w[0]) + keep_x) + sum(abs(wj) * v.double().abs() for wj, v in zip(w[1:], operands)))
    return (x64 + delta if keep_x else delta), scale.max().item()


def float32_twin(x, operands, w, keep_x):
    """The combination as a plain float32 program computes it, written here and sharing no code with pndm_fast:
    each weight, product and partial sum rounded to float32, the delta summed first and x added last (the
    kernels' order). The arithmetic is float64 rounded to float32 after each operation (a product of two float32
    numbers is exact in float64)."""
    def f32(t):
        return t.float().double()

    def weight(c):
        return float(np.float32(c))

    x64 = x.double()
    delta = f32(weight(w[0]) * x64)
    for wj, v in zip(w[1:], operands):
        delta = f32(delta + f32(weight(wj) * v.double()))
    return f32(x64 + delta) if keep_x else delta


def assert_close_to_truth(got, x, operands, w, keep_x):
    """`got` against float64 math: within twice the error of the float32 twin above plus one ulp of the scale,
    and within the error bound of any float32 evaluation of the sum: each of the k + 1 terms meets at most
    k + 3 roundings (its weight, its product, the partial sums, x added last), each at most half an ulp (eps/2)
    of the scale; the cap allows twice that."""
    assert not got.isnan().any(), "output not fully written (NaN poison left)"
    want, scale = truth(x, operands, w, keep_x)
    eps = torch.finfo(torch.float32).eps
    err = (got.double() - want).abs().max().item()
    err_twin = (float32_twin(x, operands, w, keep_x) - want).abs().max().item()
    bound = 2 * err_twin + eps * scale
    assert err <= bound, f"error {err:.3g} > 2 x float32 twin's error {err_twin:.3g} + 1 ulp"
    cap = (len(operands) + 3) * eps * scale
    assert err <= cap, f"error {err:.3g} > the float32 bound {cap:.3g} of a sum of {len(operands) + 1} terms"


def run(impl, x, operands, w, keep_x, keep_x2, w2, in_place):
    """Call lincomb with NaN-poisoned outputs; returns (out, out2 or None)."""
    out = x.clone() if in_place else torch.full_like(x, float("nan"))
    out2 = None if keep_x2 is None else torch.full_like(x, float("nan"))
    xin = out if in_place else x
    ops.lincomb(out, xin, operands, w, keep_x, out2, None if out2 is None else w2, bool(keep_x2), impl=impl)
    return out, out2


IMPLS = ["torch"] + (["cpp"] if ops.cpp_available() else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", range(6))
@pytest.mark.parametrize("dtypes", OPERAND_DTYPES, ids=str)
def test_matches_float64(impl, k, dtypes):
    """Every implementation against float64 math, judged by the float32 twin written in this file and capped by
    the float32 error bound. Fails if the torch path loses precision (planted: lincomb_torch rounding float32
    operands to bfloat16), and if a fault shared by every path inflates the yardstick (planted: bind rounding
    the weights to bfloat16 for every implementation, which the cap alone also catches)."""
    gen = torch.Generator().manual_seed(1000 * k + len(dtypes))
    for i, (keep_x, keep_x2, in_place) in enumerate(FLAGS):
        # every shape meets a flag set, the small ones several (the large one is slow when cores are shared)
        for shape in (SHAPES[i % len(SHAPES)], SHAPES[(i + 1) % (len(SHAPES) - 1)]):
            check_case(impl, make_case(shape, k, OPERAND_DTYPES[dtypes], gen), keep_x, keep_x2, in_place)


def check_case(impl, case, keep_x, keep_x2, in_place):
    """`impl` on one case against float64 truth, with the float32 twin written in this file as the yardstick."""
    x, operands, w, w2 = case
    out, out2 = run(impl, x, operands, w, keep_x, keep_x2, w2, in_place)
    assert_close_to_truth(out, x, operands, w, keep_x)
    if keep_x2 is not None:
        assert_close_to_truth(out2, x, operands, w2, keep_x2)


def check_blend(impl, shape, k, gen, with_out2):
    """out <- m (x + delta) + b0 k + b1 n in place over x, with a soft mask, against float64 math: within the
    float32 bound of the combination plus three roundings of the blend's terms. out2 (from the same loads) must be
    the plain combination, unblended."""
    x, operands, w, w2 = make_case(shape, k, OPERAND_DTYPES["mixed"], gen)
    mask = torch.rand(shape, generator=gen)
    mask[mask < 0.3] = 0.0  # kept pixels, as inpainting's
    known_image, known_noise = (1 - mask) * torch.randn(shape, generator=gen), (1 - mask) * torch.randn(shape)
    b = [0.8, 0.6]
    out, out2 = x.clone(), torch.full_like(x, float("nan")) if with_out2 else None
    ops.lincomb(out, out, operands, w, True, out2, w2 if with_out2 else None, False,
                blend=[mask, known_image, known_noise], blend_weights=b, impl=impl)
    y, scale = truth(x, operands, w, True)
    known = b[0] * known_image.double() + b[1] * known_noise.double()
    want = mask.double() * y + known
    eps = torch.finfo(torch.float32).eps
    bound = (k + 3) * eps * scale + 3 * eps * (y.abs().max().item() + known.abs().max().item())
    assert (out.double() - want).abs().max().item() <= bound
    if with_out2:
        assert_close_to_truth(out2, x, operands, w2, False)


NEEDS_CPP = pytest.mark.skipif(not ops.cpp_available(), reason="pndm_fast._C is not built")


@pytest.mark.parametrize("impl", IMPLS)
def test_the_blend_matches_float64(impl):
    """Every operand count, with and without a second output, sizes around the C++ chunk and threading limits.
    Fails when a kernel leaves a term of the blend out or blends out2 too."""
    gen = torch.Generator().manual_seed(5)
    for k in range(6):
        for shape, with_out2 in ((SHAPES[k % 4], k % 2 == 0), (SHAPES[4], k == 5)):
            check_blend(impl, shape, k, gen, with_out2)


@pytest.mark.skipif(os.environ.get("PNDM_FAST_EXPECT_NO_CPP") == "1",
                    reason="this install was made without a compiler on purpose (CI's no-compiler stage)")
def test_cpp_required_in_this_checkout():
    """The editable install builds pndm_fast._C; without it the cpp tests above would silently shrink."""
    assert ops.cpp_available(), "pndm_fast._C is not built; run `pip install -e .`"
    assert ops.available_impls("cpu")[0] == "cpp"


@NEEDS_CPP
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_converts_every_16bit_pattern_like_torch(dtype):
    """All 65536 bf16/fp16 bit patterns incl. subnormals, infs and NaNs: cpp equals torch bit for bit."""
    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = torch.zeros(v.shape)
    got, want = torch.empty_like(x), torch.empty_like(x)
    ops.lincomb(got, x, [v], [0.0, 1.0], impl="cpp")
    ops.lincomb(want, x, [v], [0.0, 1.0], impl="torch")
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_and_inf_propagate(impl):
    x = torch.tensor([1.0, float("nan"), 2.0, 3.0, float("inf")])
    v = torch.tensor([float("inf"), 1.0, float("nan"), -1.0, 1.0])
    out = torch.empty_like(x)
    ops.lincomb(out, x, [v], [-1e-3, 0.5], impl=impl)
    # x = inf gives inf + (A-1)*inf = inf - inf = NaN, as in the formula's plain-torch twin
    assert out[0] == float("inf") and out[1].isnan() and out[2].isnan() and out[4].isnan()
    assert out[3] == pytest.approx(3.0 - 3e-3 - 0.5)


@pytest.mark.parametrize("impl", IMPLS)
def test_channels_last(impl):
    gen = torch.Generator().manual_seed(5)
    x, operands, w, _ = make_case((2, 3, 5, 7), 3, OPERAND_DTYPES["mixed"], gen)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in [x] + operands]
    out = torch.full_like(cl[0], float("nan"))
    ops.lincomb(out, cl[0], cl[1:], w, impl=impl)
    want = torch.empty_like(x)
    ops.lincomb(want, x, operands, w, impl="torch")
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, want, rtol=2e-6, atol=1e-6)


def test_float64_runs_in_torch():
    gen = torch.Generator().manual_seed(7)
    x, operands, w, w2 = make_case((3, 3, 17, 19), 4, [torch.float64, torch.float32, torch.bfloat16, torch.float64],
                                   gen)
    x = x.double()
    out, out2 = torch.empty_like(x), torch.empty_like(x)
    ops.lincomb(out, x, operands, w, True, out2, w2, False)  # auto -> torch for float64
    want, _ = truth(x, operands, w, True)
    want2, _ = truth(x, operands, w2, False)
    torch.testing.assert_close(out, want, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(out2, want2, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_tensors_are_a_no_op(impl):
    """Zero elements: nothing is written, not even next to the (empty) outputs, and the checks still apply."""
    buf = torch.full((8,), 7.0)
    out, out2, x = buf[2:2].view(0, 3), buf[5:5].view(0, 3), torch.empty(0, 3)
    ops.lincomb(out, x, [torch.empty(0, 3, dtype=torch.bfloat16)], [0.1, 0.2], True, out2, [0.3, 0.4], impl=impl)
    assert torch.equal(buf, torch.full((8,), 7.0))
    with pytest.raises(ValueError, match="shape"):
        ops.lincomb(out, x, [torch.empty(0, 4)], [0.1, 0.2], impl=impl)


def _args(shape=(2, 3, 4, 4), k=2, dtype=torch.float32):
    x = torch.randn(shape)
    return torch.empty_like(x), x, [torch.randn(shape).to(dtype) for _ in range(k)], [0.1] * (k + 1)


def _shifted_by_one():
    """out and x one element apart in one buffer: overlapping but not the same tensor."""
    buf = torch.randn(33)
    return {"x": buf[:32], "out": buf[1:]}


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(impl="fast"), ValueError, "impl='fast' is not one of"),
        (lambda a: a.update(x=a["x"].long()), TypeError, "x has dtype torch.int64; expected torch.float32"),
        (lambda a: a.update(out=a["out"].half()), TypeError, "out has dtype torch.float16 but x has torch.float32"),
        (lambda a: a["operands"].__setitem__(1, a["operands"][1].int()), TypeError, r"operands\[1\] has dtype"),
        (lambda a: a.update(x=a["x"].double(), out=a["out"].double(), impl="cpp"), TypeError, "float64"),
        (lambda a: a.update(operands=[a["operands"][0].double()] * 2, impl="cpp"), TypeError, "float64"),
        (lambda a: a.update(x=a["x"][..., :3].contiguous()), ValueError, r"out has shape \(2, 3, 4, 4\) but x has"),
        (lambda a: a["operands"].__setitem__(0, a["operands"][0][:1]), ValueError, r"operands\[0\] has shape"),
        (lambda a: a.update(out=a["out"].to("meta")), ValueError, "out is on meta but x is on cpu"),
        (lambda a: a.update(x=a["x"].transpose(2, 3)), ValueError, r"x must be contiguous.*call \.contiguous\(\)"),
        (lambda a: a.update(x=a["x"].contiguous(memory_format=torch.channels_last)), ValueError, "contiguous"),
        (lambda a: a.update(operands=[a["x"]] * 6, weights=[0.1] * 7), ValueError, "at most 5 operands"),
        (lambda a: a.update(weights=[0.1, 0.2]), ValueError, "2 operands need 3 weights"),
        (lambda a: a.update(out2=torch.empty_like(a["x"])), ValueError, "out2 and weights2 go together"),
        (lambda a: a.update(out2=torch.empty_like(a["x"]), weights2=[1.0]), ValueError, "need 3 weights2"),
        (lambda a: a.update(operands=[a["out"], a["x"]]), ValueError, r"operands\[0\] overlaps out"),
        (lambda a: a.update(out2=a["out"], weights2=[0.1] * 3), ValueError, "out overlaps out2"),
        (lambda a: a.update(_shifted_by_one(), operands=[], weights=[1.0]), ValueError, "x overlaps out"),
        (lambda a: a.update(impl="cpp", **{n: a[n].to("meta") for n in ("out", "x")},
                            operands=[v.to("meta") for v in a["operands"]]), ValueError, "impl='cpp' runs on CPU"),
        (lambda a: a.update(out="not a tensor"), TypeError, "out must be a torch.Tensor, got str"),
        (lambda a: a.update(blend=[a["x"]] * 3), ValueError, "blend and blend_weights go together"),
        (lambda a: a.update(blend=[a["x"]] * 2, blend_weights=[1.0, 0.0]), ValueError, "a blend is 3 tensors"),
        (lambda a: a.update(blend=[a["x"].half()] * 3, blend_weights=[1.0, 0.0]), TypeError,
         r"blend\[0\] has dtype torch.float16 but x has torch.float32"),
        (lambda a: a.update(blend=[a["x"], a["out"], a["x"]], blend_weights=[1.0, 0.0]), ValueError,
         r"blend\[1\] overlaps out"),
    ],
)
def test_errors_say_what_to_do(mutate, error, match):
    args = dict(zip(("out", "x", "operands", "weights"), _args()), impl="auto")
    mutate(args)
    with pytest.raises(error, match=match):
        ops.lincomb(**args)


@NEEDS_CPP
def test_kernel_constants_agree_with_the_cpp_build():
    """csrc/lincomb.cpp has its own compile-time copies; the built module must carry the Python values."""
    from pndm_fast.kernels import constants

    assert ops._C.MAX_OPERANDS == constants.MAX_OPERANDS
    assert ops._C.DTYPE_CODES == {str(d)[6:]: code for d, code in constants.OPERAND_CODES.items()}


def _bad_direct_calls():
    """(name, out, x, operands, weights, out2, weights2, error, match) calls that would hand C++ bad pointers."""
    x = torch.randn(4, 4)
    v = torch.randn(4, 4)
    cases = [
        ("small out", torch.empty(2, 2), x, [v], [0.1, 0.2], None, None, ValueError, "out has shape"),
        ("small operand", torch.empty_like(x), x, [v[:1]], [0.1, 0.2], None, None, ValueError, r"operands\[0\]"),
        ("small out2", torch.empty_like(x), x, [v], [0.1, 0.2], torch.empty(3), [0.0, 1.0], ValueError, "out2"),
        ("float64 x", torch.empty_like(x).double(), x.double(), [v], [0.1, 0.2], None, None, TypeError, "float64"),
        ("int operand", torch.empty_like(x), x, [v.int()], [0.1, 0.2], None, None, TypeError, "dtype"),
        ("strided x", torch.empty_like(x), x.t(), [v], [0.1, 0.2], None, None, ValueError, "contiguous"),
        ("6 operands", torch.empty_like(x), x, [v] * 6, [0.1] * 7, None, None, ValueError, "at most 5"),
        ("short weights", torch.empty_like(x), x, [v, v], [0.1], None, None, ValueError, "need 3 weights"),
        ("out2 without weights2", torch.empty_like(x), x, [v], [0.1, 0.2], torch.empty_like(x), None, ValueError,
         "go together"),
        ("operand is out", v, x, [v], [0.1, 0.2], None, None, ValueError, "overlaps out"),
        ("out2 is out", v, x, [], [0.1], v, [0.2], ValueError, "overlaps"),
        ("out inside an operand", v[1:3], x[1:3], [v[:2]], [0.1, 0.2], None, None, ValueError, "overlaps out"),
    ]
    return [pytest.param(*c[1:], id=c[0]) for c in cases]


@pytest.mark.skipif(not ops.cpp_available(), reason="pndm_fast._C is not built")
@pytest.mark.parametrize("out, x, operands, weights, out2, weights2, error, match", _bad_direct_calls())
def test_registered_cpp_op_checks_direct_calls(out, x, operands, weights, out2, weights2, error, match):
    """torch.ops.pndm_fast.lincomb_cpp_ is public through torch.ops: a bad call raises before C++ sees a pointer
    (unchecked, each of these reads or writes out of bounds or reinterprets memory)."""
    before = [t.clone() for t in (x, *operands) if t.device.type == "cpu"]
    with pytest.raises(error, match=match):
        torch.ops.pndm_fast.lincomb_cpp_(out, x, operands, weights, True, out2, weights2, False, [], [])
    assert all(torch.equal(a, b) for a, b in zip(before, [t for t in (x, *operands) if t.device.type == "cpu"]))


@pytest.mark.skipif(not ops.cpp_available(), reason="pndm_fast._C is not built")
def test_registered_cpp_op_runs_a_good_direct_call():
    gen = torch.Generator().manual_seed(3)
    x, operands, w, w2 = make_case((3, 5, 7), 2, OPERAND_DTYPES["mixed"], gen)
    out, out2 = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    torch.ops.pndm_fast.lincomb_cpp_(out, x, operands, w, True, out2, w2, False, [], [])
    assert_close_to_truth(out, x, operands, w, True)
    assert_close_to_truth(out2, x, operands, w2, False)
    blended = torch.full_like(x, float("nan"))
    torch.ops.pndm_fast.lincomb_cpp_(blended, x, operands, w, True, None, None, False,
                                     [torch.zeros_like(x), x.abs(), torch.ones_like(x)], [2.0, 0.5])
    assert torch.equal(blended, 2 * x.abs() + 0.5)  # mask 0: the known terms alone


@pytest.mark.skipif(not ops.triton_available(), reason="triton is not installed (the triton extra)")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out, x, operands, w = _args()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.lincomb(out, x, operands, w, impl="triton")


def test_cpp_missing_is_explained(monkeypatch):
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_C_ERROR", "ImportError: no _C", raising=False)
    out, x, operands, w = _args()
    with pytest.raises(ValueError, match="pndm_fast._C is not built.*pip install -e"):
        ops.lincomb(out, x, operands, w, impl="cpp")
    assert ops.available_impls("cpu")[0] != "cpp"
    ops.lincomb(out, x, operands, w)  # auto falls back to torch


@pytest.mark.parametrize("impl", ["auto", pytest.param("torch", marks=pytest.mark.slow)])  # torch: 8 s of inductor
def test_torch_compile_fullgraph_equals_eager(impl):
    """torch.compile traces through lincomb (the cpp op is opaque, so its results match bit for bit), a blend of
    the first output included."""
    mask = (torch.arange(2 * 3 * 17 * 19).view(2, 3, 17, 19) % 3 == 0).float()
    known = [(1 - mask) * torch.linspace(-1, 1, mask.numel()).view(mask.shape), (1 - mask) * 0.5]

    def step(x, eps, hist, x_next):
        # in place x <- x + delta, blended, and a second output from the same operands
        ops.lincomb(x, x, [eps, hist], [-1e-3, 0.5, -0.25], True, x_next, [0.0, 1.5, -0.5], False,
                    blend=[mask, *known], blend_weights=[0.7, 0.3], impl=impl)
        return x_next * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    gen = torch.Generator().manual_seed(11)
    x, (eps, hist), _, _ = make_case((2, 3, 17, 19), 2, [torch.float32, torch.bfloat16], gen)
    xe, xc = x.clone(), x.clone()
    ne, nc = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    re, rc = step(xe, eps, hist, ne), compiled(xc, eps, hist, nc)
    if impl == "auto":  # cpp when built, else the torch twin, either way run as is by the compiled graph
        assert torch.equal(xe, xc) and torch.equal(ne, nc) and torch.equal(re, rc)
    else:  # inductor generates its own loop for the torch twin: same math, maybe another rounding order
        torch.testing.assert_close(xc, xe, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(nc, ne, rtol=1e-6, atol=1e-6)
