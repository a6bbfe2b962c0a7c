"""``starlift info CHECKPOINT``: parameters, bytes per dtype, config summary, KV-cache memory."""

from __future__ import annotations

import argparse
import json

from starlift.model.config import PRESETS, Starcoder2Config, human_bytes
from starlift.model.folders import resolve_checkpoint, weight_files


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder, bundled name, preset name (e.g. starcoder2-3b), or a Hub id "
                   "already in the local Hugging Face cache")
    p.add_argument("--context", type=int, default=None,
                   help="tokens of context to size the KV cache for (default: the model's context)")
    p.add_argument("--batch", type=int, default=1, help="batch size for the KV-cache estimate")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def describe(config: Starcoder2Config, context: int | None = None, batch: int = 1) -> dict:
    n = config.num_parameters()
    context = context or config.max_position_embeddings
    # With a sliding window only the last `window` keys are ever read, but a concat-grow cache
    # keeps them all; report both.
    kept = min(context, config.attention_window)
    return {
        "task": config.task,
        "labels": list(config.head.labels) if config.head else None,
        "parameters": n,
        "weight_bytes": {"fp32": 4 * n, "fp16": 2 * n, "bf16": 2 * n, "int8": n, "int4": n // 2},
        "config": {
            "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim, "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size, "context": config.max_position_embeddings,
            "sliding_window": config.sliding_window, "rope_theta": config.rope_theta,
            "tied_embeddings": config.tie_word_embeddings, "hidden_act": config.hidden_act,
        },
        "peak_memory_estimate": peak_memory(config),
        "kv_cache": {
            "context": context, "batch": batch,
            "fp16_bytes_full": config.kv_cache_bytes(context, batch, 2),
            "fp32_bytes_full": config.kv_cache_bytes(context, batch, 4),
            "fp16_bytes_window": config.kv_cache_bytes(kept, batch, 2),
        },
    }


def peak_memory(config: Starcoder2Config) -> dict[str, int]:
    """The estimator's peak (bytes) for each stage of the big-model path (docs/guide/big-models.md):
    fp16 export validated on a cut graph, streaming int4 from it, one generation, parity."""
    from starlift.core import memory

    hf = config.to_hf()
    cut = memory.CUT_LAYERS if config.num_hidden_layers > memory.CUT_LAYERS else 0
    return {
        "export_fp16": memory.estimate_export(hf, "fp16", validate_layers=cut, checkpoint_dtype="fp16"),
        "export_fp16_whole_validation": memory.estimate_export(hf, "fp16", validate_layers=0, checkpoint_dtype="fp16"),
        "quantize_int4_streaming": memory.estimate_quantize(hf, "fp16", "int4", quality_layers=cut, streaming=True),
        "generate_int4": memory.estimate_run(hf, "int4"),
        "parity_int4_vs_fp16_reference": memory.estimate_run(hf, "int4", reference_dtype="fp16"),
    }


def main(args: argparse.Namespace) -> int:
    if args.checkpoint in PRESETS:
        config, files = PRESETS[args.checkpoint], []
    else:
        folder = resolve_checkpoint(args.checkpoint)
        config = Starcoder2Config.from_hf(folder)
        files = weight_files(folder, allow_pickle=True)
    if args.context is not None and args.context <= 0:
        from starlift.core.errors import UsageError

        raise UsageError(f"--context must be positive, got {args.context}")
    info = describe(config, args.context, args.batch)
    info["files"] = {f.name: f.stat().st_size for f in files}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["config"]
    print(f"StarCoder2: {info['parameters'] / 1e6:.2f}M parameters")
    if config.head is not None:
        print(f"  {config.architecture}: {config.head.num_labels} labels ({', '.join(config.head.labels)}), "
              f"pad_token_id {config.pad_token_id}")
    print(f"  hidden {c['hidden_size']}, {c['layers']} layers, {c['heads']} heads ({c['kv_heads']} KV heads, "
          f"head_dim {c['head_dim']}), MLP {c['intermediate_size']}, vocab {c['vocab_size']}")
    print(f"  context {c['context']}, sliding window {c['sliding_window']}, rope_theta {c['rope_theta']}, "
          f"tied embeddings {c['tied_embeddings']}, {c['hidden_act']}")
    print("  weights: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in info["weight_bytes"].items()))
    for name, size in info["files"].items():
        print(f"  file {name}: {human_bytes(size)}")
    kv = info["kv_cache"]
    print(f"  KV cache for {kv['context']} tokens x batch {kv['batch']}: fp16 {human_bytes(kv['fp16_bytes_full'])}, "
          f"fp32 {human_bytes(kv['fp32_bytes_full'])} (window-bounded fp16: {human_bytes(kv['fp16_bytes_window'])})")
    print("  estimated peak memory: " + ", ".join(f"{k.replace('_', ' ')} {human_bytes(v)}"
                                                  for k, v in info["peak_memory_estimate"].items()))
    return 0
