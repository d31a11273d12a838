"""Peak memory and time of `hyperllava-convert` on a generated checkpoint of more than a billion parameters.

Writes a LLaVA-codebase stage-2 checkpoint (Llama text model, projector, fp16, several `pytorch_model-*.bin` or
`model-*.safetensors` shards with their index) and a CLIP vision tower folder, all random, then converts it in a
fresh process and reports its peak RSS against the largest input shard: streaming conversion keeps it near
one input shard plus one output shard (plus the interpreter), not the whole model.

    python benchmarks/bench_convert.py                      # 1.17B parameters, 4 .bin shards
    python benchmarks/bench_convert.py --format safetensors --layers 24
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from transformers_hyperllava.tiny_tokenizer import DEFAULT_TEXTS, train_tokenizer

CONVERTER = "transformers_hyperllava.conversion.convert_hyperllava_weights_to_hf"


def llama_tensors(args):
    """(name, shape) of every weight of the LLaVA-codebase checkpoint, in the order a trainer saves them."""
    d, ffn = args.hidden_size, args.intermediate_size
    yield "model.embed_tokens.weight", (args.vocab_size, d)
    for i in range(args.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"model.layers.{i}.self_attn.{proj}.weight", (d, d)
        yield f"model.layers.{i}.mlp.gate_proj.weight", (ffn, d)
        yield f"model.layers.{i}.mlp.up_proj.weight", (ffn, d)
        yield f"model.layers.{i}.mlp.down_proj.weight", (d, ffn)
        yield f"model.layers.{i}.input_layernorm.weight", (d,)
        yield f"model.layers.{i}.post_attention_layernorm.weight", (d,)
    yield "model.norm.weight", (d,)
    yield "model.mm_projector.0.weight", (d, args.vision_hidden_size)
    yield "model.mm_projector.0.bias", (d,)
    yield "model.mm_projector.2.weight", (d, d)
    yield "model.mm_projector.2.bias", (d,)
    yield "lm_head.weight", (args.vocab_size, d)


def write_checkpoint(folder: Path, args) -> tuple[int, int]:
    """Writes the shards one at a time (so that generating them needs one shard of memory); returns the number of
    parameters and the largest shard's size in bytes."""
    folder.mkdir(parents=True)
    entries = list(llama_tensors(args))
    total = sum(torch.Size(shape).numel() for _, shape in entries)
    per_shard = -(-total // args.shards)
    weight_map, shard, shard_numel, names = {}, {}, 0, []

    def flush():
        name = (
            f"pytorch_model-{len(names) + 1:05d}-of-{args.shards:05d}.bin"
            if args.format == "bin"
            else f"model-{len(names) + 1:05d}-of-{args.shards:05d}.safetensors"
        )
        if args.format == "bin":
            torch.save(shard, folder / name)
        else:
            save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        names.append(name)
        shard.clear()

    generator = torch.Generator().manual_seed(0)
    for key, shape in entries:
        shard[key] = torch.randn(shape, generator=generator, dtype=torch.float16) * 0.02
        shard_numel += shard[key].numel()
        if shard_numel >= per_shard:
            flush()
            shard_numel = 0
    if shard:
        flush()
    # The names follow the real count, which can fall one short of --shards.
    for old in names:
        new = old.replace(f"-of-{args.shards:05d}", f"-of-{len(names):05d}")
        (folder / old).rename(folder / new)
        weight_map = {k: (new if v == old else v) for k, v in weight_map.items()}
    index = "pytorch_model.bin.index.json" if args.format == "bin" else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}))

    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden_size // 128,
        "num_key_value_heads": args.hidden_size // 128,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "float16",
        "mm_vision_tower": "clip",
        "mm_hidden_size": args.vision_hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
    }
    (folder / "config.json").write_text(json.dumps(config))
    train_tokenizer(DEFAULT_TEXTS).save_pretrained(folder)
    return total, max((folder / name).stat().st_size for name in weight_map.values())


def write_clip(folder: Path, args):
    """A small CLIP vision tower (2 layers) at LLaVA-1.5's width and resolution."""
    config = CLIPVisionConfig(
        hidden_size=args.vision_hidden_size,
        intermediate_size=4 * args.vision_hidden_size,
        num_hidden_layers=2,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIPVisionModel(config).state_dict().items()}
    tensors = {f"vision_model.{k}": torch.randn(shape, dtype=torch.float16) * 0.02 for k, shape in shapes.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# Runs the converter (or only imports it, without arguments) and prints the process's own peak RSS. VmHWM belongs to
# the process image: unlike getrusage, it does not inherit the benchmark's memory through fork.
MEASURE = f"""
import sys
from {CONVERTER} import main
code = main(sys.argv[1:]) if len(sys.argv) > 1 else 0
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")))
sys.exit(code)
"""


def peak_rss_of(arguments, env, log: Path) -> tuple[int, float]:
    """Peak RSS (bytes) and wall time of the converter run in a fresh process with `arguments`."""
    start = time.perf_counter()
    with open(log, "w") as output:
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, *arguments], env=env, stdout=output, stderr=output, check=False
        )
    elapsed = time.perf_counter() - start
    text = log.read_text()
    if done.returncode != 0:
        sys.exit(f"the conversion failed:\n{text[-3000:]}")
    kilobytes = int(text.rsplit("VmHWM:", 1)[1].split()[0])
    return kilobytes * 1024, elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--intermediate-size", type=int, default=5632)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--vision-hidden-size", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--format", choices=["bin", "safetensors"], default="bin")
    parser.add_argument("--max-shard-size", default=None, help="output shard size (default: the input's)")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp folder)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    try:
        start = time.perf_counter()
        params, largest_shard = write_checkpoint(workdir / "llava-run", args)
        write_clip(workdir / "clip", args)
        print(f"generated {params / 1e9:.2f}B parameters in {time.perf_counter() - start:.0f} s")

        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        baseline, _ = peak_rss_of([], env, workdir / "imports.log")
        max_shard = args.max_shard_size or str(largest_shard)
        arguments = [
            "--input", str(workdir / "llava-run"), "--vision-tower", str(workdir / "clip"),
            "--output", str(workdir / "out"), "--max-shard-size", max_shard,
        ]  # fmt: skip
        peak, elapsed = peak_rss_of(arguments, env, workdir / "convert.log")
        output_shards = [p.stat().st_size for p in (workdir / "out").glob("model*.safetensors")]
        gib = 2**30
        rows = [
            ("parameters", f"{params / 1e9:.2f} B (fp16, {args.format}, {args.shards} shards)"),
            ("checkpoint size", f"{2 * params / gib:.2f} GiB"),
            ("largest input shard", f"{largest_shard / gib:.2f} GiB"),
            ("largest output shard", f"{max(output_shards) / gib:.2f} GiB ({len(output_shards)} shards)"),
            ("interpreter + imports RSS", f"{baseline / gib:.2f} GiB"),
            ("peak RSS of the conversion", f"{peak / gib:.2f} GiB"),
            ("peak RSS / largest input shard", f"{peak / largest_shard:.2f}"),
            ("(peak - imports) / largest input shard", f"{(peak - baseline) / largest_shard:.2f}"),
            ("peak RSS / checkpoint size", f"{peak / (2 * params):.2f}"),
            ("conversion time", f"{elapsed:.1f} s ({2 * params / gib / elapsed:.2f} GiB/s)"),
        ]
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            print(f"{name:<{width}}  {value}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
