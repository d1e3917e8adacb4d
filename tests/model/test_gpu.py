"""GPU path: bf16 through Float16Module, SDPA attention, the codegen2-1B preset. Skipped without CUDA."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_sdpa_step_codegen2_1b():
    from cglab.config import from_dict
    from cglab.distributed import destroy_parallel, init_parallel
    from cglab.train.step import build_train_state, train_step

    cfg = from_dict(
        {},
        [
            "model.preset=codegen2-1B",
            "parallel.use_gpu=true",
            "train.precision=bf16",
            "data.seq_length=2048",
            "train.micro_batch_size=2",
            "train.global_batch_size=2",
            "model.attention_backend=sdpa",
            "objective.kind=clm",
        ],
    )  # synthetic batch: no sentinels
    init_parallel(1, 1)
    try:
        state = build_train_state(cfg)
        tok = torch.randint(0, 51200, (2, 2048))
        b = {
            "tokens": tok,
            "labels": torch.roll(tok, -1, 1),
            "loss_mask": torch.ones(2, 2048),
            "segment_ids": torch.zeros(2, 2048, dtype=torch.long),
        }
        first = train_step(state, cfg, [b])
        for _ in range(3):
            last = train_step(state, cfg, [b])
        assert 9.0 < first["loss"] < 12.0  # ~ln(51200) at init
        assert last["loss"] < first["loss"]
        assert next(state.model[0].parameters()).dtype == torch.bfloat16
    finally:
        destroy_parallel()


def test_bf16_logits_close_to_hf_fp32():
    from cglab.config import from_dict
    from cglab.distributed import destroy_parallel, init_parallel
    from cglab.model.codegen import build_model, forward_logits
    from cglab.model.hf_convert import hf_to_cglab, load_into
    from tests.model.conftest import tiny_hf

    m = from_dict({}, ["model.preset=small"]).model
    hf = tiny_hf(m).cuda()
    init_parallel(1, 1)
    try:
        ours = build_model(m, from_dict({}, []).parallel).eval()
        load_into(ours, {k: v.cuda() for k, v in hf_to_cglab(hf.state_dict(), m).items()})
        tok = torch.randint(0, m.vocab_size, (2, 128), device="cuda")
        with torch.no_grad():
            ref = hf(input_ids=tok).logits
            with torch.autocast("cuda", dtype=torch.bfloat16):
                got = forward_logits(ours, m, tok, torch.zeros_like(tok)).float()
        rel = (got - ref).norm() / ref.norm()
        assert rel < 2e-2, rel
    finally:
        destroy_parallel()


def test_compile_fusions_match_unfused_bf16():
    """The compiled qkv + rotary and residual kernels (Triton on GPU) give the unfused model's logits and loss."""
    from cglab.config import from_dict
    from cglab.distributed import destroy_parallel, init_parallel
    from cglab.model.codegen import build_model, forward_logits

    init_parallel(1, 1)
    try:
        logits = []
        for fused in (False, True):
            m = from_dict(
                {},
                ["model.preset=small", "model.attention_backend=sdpa", f"model.compile_fusions={str(fused).lower()}"],
            ).model
            model = build_model(m, from_dict({}, []).parallel, seed=3).eval()
            tok = torch.randint(0, m.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0)).cuda()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                logits.append(forward_logits(model, m, tok, torch.zeros_like(tok)).float())
        rel = (logits[1] - logits[0]).norm() / logits[0].norm()
        assert logits[0].abs().max() > 0.1 and rel < 1e-2, rel
    finally:
        destroy_parallel()


def test_flex_block_mask_matches_dense_mask_forward_and_backward():
    """FlexAttention (compiled, Triton) with the document + prefix block mask vs SDPA with the dense mask."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    from cglab.model.fused import compiled
    from cglab.model.masks import attention_mask, block_mask

    b, h, s, d = 2, 4, 512, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    seg = (torch.rand(b, s, generator=g, device="cuda") < 0.01).long().cumsum(1)
    # per token, as the data gives it: every document's tokens see its first 40 positions; row 1 has no prefix
    idx = torch.arange(s, device="cuda").expand(b, s)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    pre = torch.where(starts, idx, 0).cummax(1).values + 40
    pre[1] = 0
    qkv = [
        torch.randn(b, h, s, d, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    ]
    ref_in = [t.detach().clone().requires_grad_() for t in qkv]
    got = compiled(flex_attention)(*qkv, block_mask=block_mask(seg, pre, seq_len=s, batch=b, device="cuda"))
    ref = F.scaled_dot_product_attention(
        *ref_in, attn_mask=~attention_mask(seg, pre, seq_len=s, batch=b, device="cuda")
    )
    up = torch.randn_like(ref)
    got.backward(up)
    ref.backward(up)
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    for a, r in zip(qkv, ref_in):
        torch.testing.assert_close(a.grad, r.grad, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("kernel, marker", [("cudnn", "cudnn"), ("flash", "flash_fwd")])
def test_sdpa_kernel_choice_runs_that_kernel_with_the_same_result(kernel, marker):
    """model.sdpa_kernel picks the kernel that runs (seen in the profiler), forward and backward close to the
    efficient kernel's in bf16."""
    from torch.profiler import ProfilerActivity, profile

    from cglab.config import from_dict
    from cglab.model.attention import SDPAttention
    from cglab.model.codegen import transformer_config

    cfg = from_dict({}, ["model.preset=tiny"])
    tc = transformer_config(cfg.model, cfg.parallel)
    b, h, s, d = 2, 16, 1024, 128  # the codegen2-1B head shape
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = [
        torch.randn(b, h, s, d, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    ]
    ref_in = [t.detach().clone().requires_grad_() for t in qkv]
    attn = SDPAttention(tc, 1, None, "self", kernel=kernel)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = attn.attend(*qkv, None)
        up = torch.randn_like(out)
        out.backward(up)
        torch.cuda.synchronize()
    names = " ".join(e.key.lower() for e in prof.key_averages())
    assert marker in names, names[:2000]
    ref = SDPAttention(tc, 1, None, "self", kernel="efficient").attend(*ref_in, None)
    ref.backward(up)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for a, r in zip(qkv, ref_in):
        torch.testing.assert_close(a.grad, r.grad, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
    "variant",
    [
        ["model.compile_fusions=true", "model.wgrad_fusion=false"],
        ["model.compile_fusions=false", "model.wgrad_fusion=true"],
        ["model.compile_fusions=true", "model.wgrad_fusion=true"],
    ],
)
def test_fused_train_step_matches_unfused_loss_and_main_grads(variant):
    """Compiled loss (TP=1) and wgrad-into-main_grad accumulation: the same loss and fp32 main grads as the plain
    bf16 step, through Megatron DDP, over two micro-batches (so the accumulation adds to a non-zero main_grad)."""
    from cglab.config import from_dict
    from cglab.distributed import destroy_parallel, init_parallel
    from cglab.train import step as st

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        tok = torch.randint(0, 1024, (2, 256), generator=g)
        batches.append(
            {
                "tokens": tok,
                "labels": torch.roll(tok, -1, 1),
                "loss_mask": torch.ones(2, 256),
                "segment_ids": torch.zeros(2, 256, dtype=torch.long),
                "objective": torch.zeros(2, dtype=torch.long),
            }
        )
    results = []
    for ov in (["model.compile_fusions=false", "model.wgrad_fusion=false"], variant):
        cfg = from_dict(
            {},
            [
                "model.preset=small",
                "parallel.use_gpu=true",
                "train.precision=bf16",
                "data.seq_length=256",
                "train.micro_batch_size=2",
                "train.global_batch_size=4",
                "model.document_masking=false",
                *ov,
            ],
        )
        init_parallel(1, 1)
        try:
            state = st.build_train_state(cfg)
            loss = st.reduce_stats(st.forward_backward(state, cfg, batches))["loss"]
            grads = torch.cat([p.main_grad.flatten().float() for p in state.model[0].parameters()])
            results.append((loss, grads.clone()))
        finally:
            destroy_parallel()
    (loss0, g0), (loss1, g1) = results
    assert abs(loss1 - loss0) < 1e-2 * abs(loss0)
    assert g0.norm() > 0 and (g1 - g0).norm() / g0.norm() < 3e-2


def test_fold_grad_scale_bf16_matches_megatron_step():
    """train.fold_grad_scale (the GPU default) on the bf16 path (Float16Optimizer, fused AdamW on CUDA): the same
    grad norm, the same grads left behind and the same next loss as Megatron's own scaling and clip."""
    from cglab.config import from_dict
    from cglab.distributed import destroy_parallel, init_parallel
    from cglab.train import step as st

    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        tok = torch.randint(0, 1024, (2, 256), generator=g)
        batches.append(
            {
                "tokens": tok,
                "labels": torch.roll(tok, -1, 1),
                "loss_mask": (torch.rand(2, 256, generator=g) > 0.3).float(),
                "segment_ids": torch.zeros(2, 256, dtype=torch.long),
            }
        )
    results = []
    for ov in (["train.fold_grad_scale=false"], []):
        cfg = from_dict(
            {},
            [
                "model.preset=small",
                "parallel.use_gpu=true",
                "train.precision=bf16",
                "data.seq_length=256",
                "train.micro_batch_size=2",
                "train.global_batch_size=4",
                "train.grad_clip=0.5",
                "train.warmup_steps=0",
                *ov,
            ],
        )
        init_parallel(1, 1)
        try:
            state = st.build_train_state(cfg)
            first = st.train_step(state, cfg, batches[:2])
            grads = torch.cat([p.main_grad.flatten().float() for p in state.model[0].parameters()]).clone()
            second = st.train_step(state, cfg, batches[2:])
            results.append((first, grads, second, state.grad_fold))
        finally:
            destroy_parallel()
    (f0, g0, s0, fold0), (f1, g1, s1, fold1) = results
    assert fold0 is None and fold1 is not None
    assert f0["grad_norm"] > 0.5  # the clip engaged
    assert f1["loss"] == f0["loss"]
    assert abs(f1["grad_norm"] - f0["grad_norm"]) < 1e-4 * f0["grad_norm"]
    assert (g1 - g0).norm() / g0.norm() < 1e-4
    assert abs(s1["loss"] - s0["loss"]) < 1e-3 * s0["loss"]


def test_background_checkpoint_holds_its_step_on_gpu(tmp_path):
    """train.async_save's GPU path (tests/train/test_checkpoint_async.py runs it on the CPU): Megatron's preload copies
    the CUDA tensors to host memory before the writer process forks from this CUDA process, so the two steps trained
    while the write is held do not reach it; the checkpoint, COMPLETE only after its write, resumes at its step."""
    from cglab.config import from_dict
    from cglab.distributed import destroy_parallel, init_parallel
    from cglab.train import checkpoint
    from cglab.train.checkpoint import DataPosition
    from cglab.train.checkpoint_writes import Write, Writes
    from cglab.train.step import build_train_state, train_step

    cfg = from_dict(
        {},
        [
            "model.preset=tiny",
            "parallel.use_gpu=true",
            "train.precision=bf16",
            "train.micro_batch_size=2",
            "train.global_batch_size=2",
            "train.warmup_steps=1",
            "train.lr=1e-3",
        ],
    )
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        tok = torch.randint(0, 1000, (2, 64), generator=g)
        batches.append(
            {
                "tokens": tok,
                "labels": torch.roll(tok, -1, 1),
                "loss_mask": torch.ones(2, 64),
                "segment_ids": torch.zeros(2, 64, dtype=torch.long),
            }
        )
    init_parallel(1, 1)
    try:
        state = build_train_state(cfg)
        assert state.decisions.async_save  # the default on GPU
        for b in batches[:2]:
            train_step(state, cfg, [b])
        writes, d = Writes(background=True), tmp_path / "c"
        writes.hold = tmp_path / "gate"
        writes.start(checkpoint.request(d, state, 2, DataPosition(0, 4)), Write(d, 2))
        meanwhile = [train_step(state, cfg, [b])["loss"] for b in batches[2:]]
        assert writes.in_flight and not (d / checkpoint.MARKER).exists()
        (tmp_path / "gate").touch()
        writes.finalize(blocking=True)
        assert writes.take() == [Write(d, 2)]
        checkpoint.verify(d)
        fresh = build_train_state(cfg)
        assert checkpoint.load(d, fresh) == (2, DataPosition(0, 4))
        again = [train_step(fresh, cfg, [b])["loss"] for b in batches[2:]]
        # bf16 on a GPU: kernels may reduce in another order from run to run, hence a relative tolerance (not yet
        # run on a device: written without one, to be confirmed when a GPU is lent); on the CPU the match is exact
        assert again == pytest.approx(meanwhile, rel=2e-4)
    finally:
        destroy_parallel()
