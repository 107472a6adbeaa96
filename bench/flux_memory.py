"""ESTIMATE (not a measurement) of the GPU memory of one caspec training step on FLUX.1-dev (not a test).

Nothing is allocated: FLUX.1-dev's ``FluxTransformer2DModel(**flux_dev_config())``, FLUX.1's CLIP-L
(``CLIPTextModel``), T5-XXL (``T5EncoderModel``) and 16-channel VAE (``AutoencoderKL``) are built on the meta
device, so parameter counts are exact. Activations are ESTIMATED two ways, which the script prints side by side:

* a hand formula per block (bytes per token, below), and
* a *saved-tensor census*: the real forward of the meta models (caspec's LoRA injected with caspec's own
  ``inject_lora``, LoRA cast to fp32 as the trainer does) runs under ``torch.autograd.graph.saved_tensors_hooks``
  and every tensor autograd keeps for backward is counted once per storage (parameters excluded). Attention is
  counted as SDPA flash / memory-efficient attention (``F.scaled_dot_product_attention`` is routed to
  ``aten._scaled_dot_product_flash_attention``, or ``_efficient_attention`` where there is a mask or bias, as on
  a GPU): q, k, v, out and the log-sum-exp are kept, never an L x L matrix.

What the step is (phase 2 of caspec's trainer): batch 1, latents cached (the VAE need not be resident), T5 prompt
length 512, bf16 base weights, the pipe's dtype bf16 with ``mixed_precision: no`` (caspec's default: no autocast),
LoRA rank 16 (alpha 16) fp32 on diffusers' default Flux transformer targets (``TRANSFORMER_TARGETS`` in
``caspec/families/flux.py``) and on CLIP-L ``q_proj, k_proj, v_proj, out_proj``, the new embedding rows (CLIP-L
and T5) fp32, AdamW (two fp32 states) over LoRA + rows. T5 has no LoRA and is in eval mode, but the T5 rows are
trained, so T5 runs forward *and backward* (to its input embeddings) every step; CLIP-L likewise. Phase 1 (rows
only, no LoRA) is shown for comparison.

Hand formula (bytes kept for backward per block; N = image + text tokens, D = 3072, F = 12288 = 4 D; bf16 2 B,
fp32 4 B). Frozen Linear layers keep nothing (they need no input for a weight gradient); a LoRA'd Linear keeps an
fp32 copy of its input (peft casts the input to the fp32 LoRA weights' dtype, one copy per layer). It is the tally
of the tensors the census finds, grouped:

* double-stream block: SDPA q, k, v, out 8ND; q/k RMSNorm (diffusers' RMSNorm keeps an fp32 copy for ``pow``)
  8ND; GELU input 2NF = 8ND; AdaLN inputs/outputs and gated outputs (5-6 bf16 hidden-size tensors per stream)
  ~11ND: phase 1 35 ND. LoRA adds q, k, v, out and MLP-in fp32 input copies 5 x 4ND and MLP-out 4NF = 16ND
  (both streams: to_q/k/v + add_q/k/v, to_out.0 + to_add_out, ff + ff_context): +36 ND, phase 2 71 N D;
* single-stream block: SDPA 8ND, RMSNorm 8ND, GELU input 8ND, AdaLN + gate 6ND: phase 1 30 ND; LoRA on to_q/k/v
  only (default targets) adds 12ND: phase 2 42 N D;
* with gradient checkpointing (diffusers' per block): each block's inputs (image + text hidden states, 2ND) stay,
  plus one block's activations while it is recomputed in backward;
* backward working set on top (ESTIMATE): the gradients live while the largest block runs backward,
  N (2F·2 + 3D·2 + D·4 + 2D·2) bytes (MLP-hidden grads, dq/dk/dv, flash's fp32 dq accumulator, block in/out grads);
* a fixed 1 GiB for the CUDA context and cuBLAS/cuDNN workspaces (outside PyTorch's allocator); allocator
  fragmentation (often 5-15 %) is NOT added.

Cards: "24 GB" and "80 GB" cards are compared at 24 and 80 GiB (what nvidia-smi shows as total; usable is a
little less). Usage: HF_HUB_OFFLINE=1 .venv/bin/python bench/flux_memory.py [--rows 8] [--rank 16]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GiB = 2 ** 30
D, FF, HEADS, HEAD_DIM = 3072, 12288, 24, 128
TEXT_TOKENS = 512
CUDA_OVERHEAD = 1.0 * GiB  # assumed: CUDA context + cuBLAS/cuDNN workspaces
CARDS = (24, 80)
# bitsandbytes NF4: 4 bit + an 8-bit absmax per 64 weights (double quant) + an fp32 constant per 256 blocks
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
SDPA_CALLS = [0]  # attention calls routed to the flash / efficient kernels (a check that the routing took)
FP8_BYTES = 1.0  # weight-only e4m3 with per-tensor / per-channel scales (scales negligible)


# ---------------------------------------------------------------------------- models on meta


def clip_l_config() -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def t5_xxl_config() -> Any:
    from transformers import T5Config

    return T5Config(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, dropout_rate=0.1, is_encoder_decoder=False,
                    tie_word_embeddings=False, use_cache=False)


def flux_vae_kwargs() -> dict[str, Any]:
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def build_models() -> dict[str, Any]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.utils import logging as dlogging
    from transformers import CLIPTextModel, T5EncoderModel

    dlogging.set_verbosity_error()  # the notice about casting with .to() (nothing is kept in fp32 in FLUX.1)

    from caspec.families.flux_names import flux_dev_config

    with torch.device("meta"):
        models = {
            "transformer": FluxTransformer2DModel(**flux_dev_config()),
            "text_encoder_2": T5EncoderModel(t5_xxl_config()),
            "text_encoder": CLIPTextModel(clip_l_config()),
            "vae": AutoencoderKL(**flux_vae_kwargs()),
        }
    for name, m in models.items():
        m.requires_grad_(False)
        if name != "vae":
            m.to(torch.bfloat16)
    models["text_encoder_2"].eval()  # T5 gets no LoRA and stays in eval mode (no dropout)
    return models


def n_params(module: Any, linear_only: bool = False) -> int:
    if linear_only:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
    return sum(p.numel() for p in module.parameters())


def inject(module: Any, targets: tuple[str, ...], rank: int) -> int:
    """caspec's LoRA injection (peft), on meta; LoRA weights cast to fp32 as the trainer does. Returns #params."""
    from caspec.assets import format as fmt

    with torch.device("meta"):
        fmt.inject_lora(module, fmt.lora_config(rank, rank, targets), "bench", trainable=True)
    params = [p for n, p in module.named_parameters() if ".bench." in n and "lora_" in n]
    for p in params:
        p.data = p.data.float()
    return sum(p.numel() for p in params)


# ---------------------------------------------------------------------------- saved-tensor census


@contextlib.contextmanager
def flash_sdpa() -> Iterator[None]:
    """Route SDPA to the flash / memory-efficient kernels' autograd (what a GPU runs), also on meta."""
    orig = F.scaled_dot_product_attention
    calls = SDPA_CALLS

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        q, k, v = query, key, value
        calls[0] += 1
        if attn_mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                                      scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask.to(q.dtype), True,
                                                                      dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


class Census:
    """Bytes autograd keeps for backward, each storage once, parameters and buffers excluded; per block too."""

    def __init__(self, *modules: Any) -> None:
        self.exclude = {t.untyped_storage()._cdata for m in modules for t in (*m.parameters(), *m.buffers())}
        self.seen: set[int] = set()
        self.total = 0
        self.blocks: list[tuple[str, int, dict[int, int]]] = []  # (kind, saved bytes, the block's input storages)
        self.keep: list[Any] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        key = st._cdata
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.total += st.nbytes()
        self.keep.append(t)
        return t

    def watch(self, blocks: Any, kind: str) -> list[Any]:
        handles = []
        for block in blocks:
            state: dict[str, Any] = {}

            def pre(_m, args, kwargs, state=state):
                ins = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                state["start"] = self.total
                state["in"] = {a.untyped_storage()._cdata: a.untyped_storage().nbytes() for a in ins}

            def post(_m, _args, _kwargs, _out, state=state):
                self.blocks.append((kind, self.total - state["start"], state["in"]))

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.register_forward_hook(post, with_kwargs=True))
        return handles

    def summary(self) -> dict[str, Any]:
        """No checkpointing: everything. Checkpointing: the non-block part, every block's inputs (the first
        block's counted, later ones are the previous block's output), and one block recomputed."""
        in_blocks = sum(b for _, b, _ in self.blocks)
        outside = self.total - in_blocks
        inputs = sum({k: v for _, _, i in self.blocks for k, v in i.items()}.values())  # temb, RoPE shared
        per_kind: dict[str, int] = {}
        for kind, b, _ in self.blocks:
            per_kind[kind] = max(per_kind.get(kind, 0), b)
        largest = max((b for _, b, _ in self.blocks), default=0)
        return {"total": self.total, "outside": outside, "per_kind": per_kind, "largest": largest,
                "checkpointed": outside + inputs + largest, "inputs": inputs}


def splice_rows(model: Any, dim: int, rows: int) -> torch.nn.Parameter:
    """caspec's splicer: the new rows (fp32 parameter) put into the token-embedding output where a new id occurs."""
    new = torch.nn.Parameter(torch.empty(rows, dim, device="meta", dtype=torch.float32))

    def hook(_m, args, out):
        sel = torch.zeros_like(args[0])
        mask = (args[0] >= 0).unsqueeze(-1)
        return torch.where(mask, new[sel].to(out.dtype), out)

    # the embedding module the forward really calls: T5EncoderModel's encoder.embed_tokens is a separate module
    # from get_input_embeddings() (its weight is tied), unless resize_token_embeddings() made them one
    used = getattr(getattr(model, "encoder", None), "embed_tokens", None) or model.get_input_embeddings()
    used.register_forward_hook(hook)
    return new


def census_text(model: Any, tokens: int, rows: int, layers: Any) -> dict[str, Any]:
    c = Census(model)
    splice_rows(model, model.get_input_embeddings().weight.shape[1], rows)
    handles = c.watch(layers, "layer")
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    with flash_sdpa(), torch.autograd.graph.saved_tensors_hooks(c.pack, lambda t: t):
        out = model(input_ids=ids)
    for h in handles:
        h.remove()
    c.out = out
    return c.summary()


def census_transformer(transformer: Any, side: int) -> dict[str, Any]:
    """One training forward of the transformer (caspec's ``FluxFamily.predict``) and the loss, on meta."""
    from diffusers import FluxPipeline

    lat = side // 8
    c = Census(transformer)
    handles = c.watch(transformer.transformer_blocks, "double") + c.watch(transformer.single_transformer_blocks,
                                                                           "single")
    dev, bf = "meta", torch.bfloat16
    z_t = torch.empty(1, 16, lat, lat, device=dev)
    target = torch.empty(1, 16, lat, lat, device=dev)
    embeds = torch.empty(1, TEXT_TOKENS, 4096, device=dev, dtype=bf, requires_grad=True)  # from T5 (rows train)
    pooled = torch.empty(1, 768, device=dev, dtype=bf, requires_grad=True)  # from CLIP-L (rows/LoRA train)
    with flash_sdpa(), torch.autograd.graph.saved_tensors_hooks(c.pack, lambda t: t):
        packed = FluxPipeline._pack_latents(z_t.to(bf), 1, 16, lat, lat)
        img_ids = FluxPipeline._prepare_latent_image_ids(1, lat // 2, lat // 2, dev, bf)
        out = transformer(hidden_states=packed, timestep=torch.empty(1, device=dev, dtype=bf),
                          guidance=torch.full([1], 3.5, device=dev), pooled_projections=pooled,
                          encoder_hidden_states=embeds, txt_ids=torch.zeros(TEXT_TOKENS, 3, device=dev, dtype=bf),
                          img_ids=img_ids, return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(out, side, side, 8)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).mean()
    for h in handles:
        h.remove()
    c.out = loss
    return c.summary()


# ---------------------------------------------------------------------------- formula


def formula(side: int, lora: bool) -> dict[str, float]:
    n_img = (side // 16) ** 2
    n = n_img + TEXT_TOKENS
    double = (71 if lora else 35) * n * D
    single = (42 if lora else 30) * n * D
    return {"tokens": n, "double": double, "single": single, "inputs": 2 * n * D,
            "transient": n * (2 * FF * 2 + 3 * D * 2 + D * 4 + 2 * D * 2)}


# ---------------------------------------------------------------------------- report


def gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8, help="new embedding rows per text encoder (pseudo-word vectors)")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    t0 = time.perf_counter()
    from caspec.families.flux import TRANSFORMER_TARGETS

    m = build_models()
    tr, t5, clip, vae = m["transformer"], m["text_encoder_2"], m["text_encoder"], m["vae"]
    counts = {k: n_params(v) for k, v in m.items()}
    linear = {k: n_params(v, linear_only=True) for k, v in m.items()}
    double_p = n_params(tr.transformer_blocks[0])
    single_p = n_params(tr.single_transformer_blocks[0])

    # phase 1 (rows only): census before LoRA
    p1 = {side: census_transformer(tr, side) for side in (512, 1024)}
    lora_tr = inject(tr, TRANSFORMER_TARGETS, args.rank)
    lora_clip = inject(clip, ("q_proj", "k_proj", "v_proj", "out_proj"), args.rank)
    clip.train()  # caspec's _set_train: LoRA'd modules train (CLIP-L has no dropout)
    tr.train()
    p2 = {side: census_transformer(tr, side) for side in (512, 1024)}
    t5_c = census_text(t5, TEXT_TOKENS, args.rows, t5.encoder.block)
    clip_c = census_text(clip, 77, args.rows, clip.text_model.encoder.layers if hasattr(clip, "text_model")
                         else clip.encoder.layers)
    elapsed = time.perf_counter() - t0

    print("# FLUX.1-dev training step: GPU memory ESTIMATE (meta-device models, nothing allocated)\n")
    print("## Parameters (exact, from the architectures)\n")
    print("| component | parameters | in nn.Linear | bf16 GiB |\n|---|---|---|---|")
    names = {"transformer": "FluxTransformer2DModel (dev)", "text_encoder_2": "T5-XXL encoder",
             "text_encoder": "CLIP-L text", "vae": "VAE (16 ch)"}
    for k, v in counts.items():
        print(f"| {names[k]} | {v:,} | {linear.get(k, 0):,} | {gib(2 * v)} |")
    print(f"| one double-stream block / one single-stream block | {double_p:,} / {single_p:,} | | "
          f"{gib(2 * double_p)} / {gib(2 * single_p)} |")
    print(f"| LoRA r{args.rank}: transformer ({len(TRANSFORMER_TARGETS)} targets) / CLIP-L q,k,v,out | "
          f"{lora_tr:,} / {lora_clip:,} | | fp32 {gib(4 * (lora_tr + lora_clip))} |")

    print("\n## Activations kept for backward (ESTIMATE: hand formula vs saved-tensor census of the real forward)\n")
    print("| resolution | tokens (img+txt) | phase | double block: formula / census GiB | single block: formula / "
          "census GiB | transformer total, no GC: census GiB | with GC: census GiB |\n|---|---|---|---|---|---|---|")
    for side in (512, 1024):
        for phase, cen in ((1, p1[side]), (2, p2[side])):
            f = formula(side, lora=phase == 2)
            print(f"| {side}² | {(side // 16) ** 2}+{TEXT_TOKENS} | {phase} | {gib(f['double'])} / "
                  f"{gib(cen['per_kind']['double'])} | {gib(f['single'])} / {gib(cen['per_kind']['single'])} | "
                  f"{gib(cen['total'])} | {gib(cen['checkpointed'])} |")
    print(f"\nT5-XXL (512 tokens, frozen, backward to the rows): no GC {gib(t5_c['total'])} GiB, "
          f"with GC {gib(t5_c['checkpointed'])} GiB (transformers checkpoints T5 layers only in train mode); "
          f"CLIP-L (77 tokens, LoRA + rows): {gib(clip_c['total'])} GiB.")

    # ---------------------------------------------------------------- totals
    rows_bytes = args.rows * (768 + 4096) * 4 * 4  # fp32 param + grad + 2 AdamW states
    lora_bytes = (lora_tr + lora_clip) * 4 * 4
    w = {"transformer": 2 * counts["transformer"], "t5": 2 * counts["text_encoder_2"],
         "clip": 2 * counts["text_encoder"], "vae": 4 * counts["vae"]}

    def total(side: int, gc: bool, tr_bytes: float | None = None, t5_bytes: float | None = None,
              t5_acts: bool = True, vae: bool = False) -> float:
        cen = p2[side]
        acts = cen["checkpointed"] if gc else cen["total"]
        if t5_acts:
            acts += t5_c["checkpointed"] if gc else t5_c["total"]
        acts += clip_c["total"]
        weights = (w["transformer"] if tr_bytes is None else tr_bytes) + (w["t5"] if t5_bytes is None else t5_bytes)
        weights += w["clip"] + (w["vae"] if vae else 0)
        return weights + lora_bytes + rows_bytes + acts + formula(side, True)["transient"] + CUDA_OVERHEAD

    def fits(x: float) -> str:  # "tight": within 10 % of the card (fragmentation, other processes)
        return " / ".join("no" if x > c * GiB else "tight" if x > 0.9 * c * GiB else "yes" for c in CARDS)

    print("\n## One phase-2 step, batch 1 (ESTIMATE, GiB)\n")
    cols = [(512, False), (512, True), (1024, False), (1024, True)]
    print("| item | " + " | ".join(f"{s}² {'GC' if g else 'no GC'}" for s, g in cols) + " |")
    print("|---|" + "---|" * len(cols))

    def row(label: str, values: list[float]) -> None:
        print(f"| {label} | " + " | ".join(gib(v) for v in values) + " |")

    row("transformer weights (bf16)", [w["transformer"]] * 4)
    row("T5-XXL weights (bf16)", [w["t5"]] * 4)
    row("CLIP-L weights (bf16)", [w["clip"]] * 4)
    row(f"LoRA r{args.rank} params + grads + AdamW m, v (fp32)", [lora_bytes] * 4)
    row(f"embedding rows ({args.rows} per encoder) + grads + AdamW (fp32)", [rows_bytes] * 4)
    row("transformer activations", [p2[s]["checkpointed" if g else "total"] for s, g in cols])
    row("T5 activations (backward to the rows)", [t5_c["checkpointed" if g else "total"] for _, g in cols])
    row("CLIP-L activations", [clip_c["total"]] * 4)
    row("backward working set (formula)", [formula(s, True)["transient"] for s, _ in cols])
    row("CUDA context + workspaces (assumed)", [CUDA_OVERHEAD] * 4)
    tots = [total(s, g) for s, g in cols]
    row("**total (VAE off the GPU)**", tots)
    row("VAE if kept resident (fp32, as caspec loads it)", [w["vae"]] * 4)
    print("| fits 24 / 80 GiB | " + " | ".join(fits(t) for t in tots) + " |")
    p1_tot = [total(s, g) - p2[s]["checkpointed" if g else "total"] + p1[s]["checkpointed" if g else "total"]
              - lora_bytes for s, g in cols]
    row("phase 1 total (rows only, no LoRA), for comparison", p1_tot)

    print("\n## What would fit 24 GiB: the saving of each change (ESTIMATE, GiB; phase 2)\n")
    tl, t5l = linear["transformer"], linear["text_encoder_2"]
    nf4_tr = w["transformer"] - tl * (2 - NF4_BYTES)
    fp8_tr = w["transformer"] - tl * (2 - FP8_BYTES)
    nf4_t5 = w["t5"] - t5l * (2 - NF4_BYTES)
    fp8_t5 = w["t5"] - t5l * (2 - FP8_BYTES)
    print("Each saving is against bf16 + GC (the GC row: against bf16 without GC).\n")
    print("| change | saving 512² | saving 1024² |\n|---|---|---|")
    for label, sav in (
        ("gradient checkpointing (transformer + T5)", [total(s, False) - total(s, True) for s in (512, 1024)]),
        ("transformer Linear weights NF4 (QLoRA; bitsandbytes, double quant)", [w["transformer"] - nf4_tr] * 2),
        ("transformer Linear weights fp8 (e4m3 weight-only)", [w["transformer"] - fp8_tr] * 2),
        ("T5 off the GPU: train CLIP-L rows only, T5 outputs cached per caption (GC on)",
         [total(s, True) - total(s, True, t5_bytes=0, t5_acts=False) for s in (512, 1024)]),
        ("T5 Linear weights NF4 (still runs forward + backward for its rows)", [w["t5"] - nf4_t5] * 2),
        ("T5 Linear weights fp8", [w["t5"] - fp8_t5] * 2),
        ("AdamW states of LoRA + rows on the CPU (paged / offloaded optimizer)",
         [(lora_tr + lora_clip + args.rows * (768 + 4096)) * 8] * 2),
        (f"LoRA rank 4 instead of {args.rank}", [lora_bytes * (1 - 4 / args.rank)] * 2),
        ("LoRA'd layers keep bf16 inputs, not peft's fp32 copies (no GC; with GC only one block's worth)",
         [0.5 * (p2[s]["total"] - p1[s]["total"]) for s in (512, 1024)]),
        ("swap one double-stream block to the CPU (block swap; costs PCIe time per step)", [2 * double_p] * 2),
        ("swap one single-stream block to the CPU", [2 * single_p] * 2),
    ):
        print(f"| {label} | {gib(sav[0])} | {gib(sav[1])} |")

    print("\n## Combinations (ESTIMATE, phase 2, batch 1, GiB; fits 24 / 80 GiB)\n")
    print("| set-up | 512² | 1024² |\n|---|---|---|")
    for label, kw in (
        ("bf16, no GC (TrainConfig's default gradient_checkpointing: false)", dict(gc=False)),
        ("bf16 + GC", dict(gc=True)),
        ("fp8 transformer + GC", dict(gc=True, tr_bytes=fp8_tr)),
        ("fp8 transformer + fp8 T5 + GC", dict(gc=True, tr_bytes=fp8_tr, t5_bytes=fp8_t5)),
        ("NF4 transformer + GC", dict(gc=True, tr_bytes=nf4_tr)),
        ("NF4 transformer + NF4 T5 + GC", dict(gc=True, tr_bytes=nf4_tr, t5_bytes=nf4_t5)),
        ("NF4 transformer + GC + T5 off the GPU (CLIP rows only)", dict(gc=True, tr_bytes=nf4_tr, t5_bytes=0,
                                                                        t5_acts=False)),
    ):
        vals = [total(s, **kw) for s in (512, 1024)]
        print(f"| {label} | " + " | ".join(f"{gib(v)} ({fits(v)})" for v in vals) + " |")
    print(f"\nattention calls routed to the flash / efficient kernels: {SDPA_CALLS[0]} "
          f"(4 transformer passes x 57 blocks + T5 24 + CLIP-L 12 = 264 expected)")
    print(f"elapsed {elapsed:.1f} s (model building + censuses); torch {torch.__version__}")


if __name__ == "__main__":
    main()
