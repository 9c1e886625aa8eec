"""Decode speed: lmforge's engine vs transformers' `generate` on the same random weights.

The config is tiny but real (vocab 8192, hidden 384, 6 layers, 6 heads, 2 KV heads, MLP 1024);
greedy decoding of 256 new tokens after a 16-token prompt, batch 1 and 8, fp32 and bf16.
Prints a table, one `RESULT` line per case, and a profile of one lmforge decode step. `--structured`
adds the cost of a JSON-schema token mask: greedy decoding with every row inside a schema's open
string (so that both runs generate the same tokens' count) against the same rows unconstrained.
`--family NAME` (gemma2, qwen3, phi3, falcon, bloom, ...) times that family instead of the Llama-family
default: a transformers model of the family at the same size (`FAMILIES`), saved and loaded by both. Without
`--family`, llama.cpp (through llama-cpp-python, in a child process) decodes the same weights at batch 1 from the
GGUF files `lmforge export gguf` writes (f32, f16) and llama.cpp quantizes (Q8_0, Q4_0), with each engine's share of
the memory-bandwidth limit. lmforge's weight-only int8 and int4 engines (`--quantize`, bfloat16 activations, eager
and compiled; int8 compiled is the C step, float32 activations) decode the same weights at batch 1 beside
llama.cpp's Q8_0 and Q4_0, with the share of their greedy tokens that float32's engine also chose (random weights: small logit margins, so a low share says little;
tests/test_quantize.py measures agreement and perplexity on a trained model). lmforge's engines are the ones a
`Session` serves with (q/k/v and gate/up projections fused), eager and compiled (`--no-compile` skips the compiled
ones): compiled at batch 1 is lmforge's C decode step (`lmforge.generate.native_step`; int4 layers it does not run
keep the torch.compile'd step), at batch 8 the torch.compile'd step. `--preset NAME` times another size, e.g. the bandwidth-bound qwen2.5-0.5b."""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable

import lmforge  # noqa: F401  (before torch: it sets OpenMP's spin count, lmforge/__init__.py)
import numpy as np
import torch

from lmforge.checkpoint import load_model, save_model
from lmforge.config import ModelConfig
from lmforge.console import hide_third_party_noise
from lmforge.generate.engine import Engine
from lmforge.generate.quantize import METHODS, Quantization
from lmforge.generate.sampling import SamplingParams
from lmforge.model import Transformer, fuse_projections
from lmforge.presets import preset


BENCH_SIZE = dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=6, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# family -> (transformers config class, fields beside BENCH_SIZE): each family's own switches at the benchmark's size,
# as in tests/hf_models.py; windows shorter than a run so that the sliding-window layers slide.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "llama3": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", {"sliding_window": 128}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 8, "num_experts_per_tok": 2}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 64, "tie_word_embeddings": True}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 64, "num_experts": 8, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 256}),
    "gemma": ("GemmaConfig", {"head_dim": 64}),
    "gemma2": ("Gemma2Config", {"head_dim": 64, "sliding_window": 128, "query_pre_attn_scalar": 64}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 64, "sliding_window": 128, "query_pre_attn_scalar": 64}),
    "phi3": ("Phi3Config", {"sliding_window": 128}),
    "falcon": ("FalconConfig", {"ffn_hidden_size": 1024, "multi_query": True, "new_decoder_architecture": False}),
    "falcon-new": ("FalconConfig", {"ffn_hidden_size": 1024, "new_decoder_architecture": True, "num_kv_heads": 2,
                                    "multi_query": False}),
    "bloom": ("BloomConfig", {}),  # its MLP is 4 x hidden
    "gpt2": ("GPT2Config", {"n_inner": 1024}),
}


def serving_engine(path: str, dtype: torch.dtype, *, compile: bool = False) -> Engine:
    """The engine a `Session` serves with: the model's q/k/v and gate/up projections fused."""
    model = load_model(path, dtype=dtype)
    fuse_projections(model)
    return Engine(model, compile=compile)


def write_model(family: str | None, max_len: int, path: str, size: str = "tiny") -> ModelConfig:
    """Write the benchmark's model to `path`: lmforge's preset `size` (random weights), or a random transformers
    model of `family` at the tiny size; returns its config as lmforge reads it."""
    if family is None:
        model = Transformer(preset(size, max_position_embeddings=max_len))
        model.init_weights(seed=0)
        save_model(model, path)
        return model.config
    import transformers

    class_name, fields = FAMILIES[family]
    config = getattr(transformers, class_name)(**BENCH_SIZE, max_position_embeddings=max_len, **fields)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return ModelConfig.from_dir(path)


def time_call(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated per sequence")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt length in tokens")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="weight dtypes to measure")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure lmforge with a torch.compile'd decode step (compiles once per case; "
                             "default on, --no-compile to skip)")
    parser.add_argument("--preset", default="tiny",
                        help="lmforge preset of the model (random weights; default tiny). A bandwidth-bound size: "
                             "qwen2.5-0.5b with --new-tokens 32 --batch-sizes 1 8 --dtypes float32")
    parser.add_argument("--profile", action="store_true", help="print a profile of one decode step")
    parser.add_argument("--structured", action="store_true",
                        help="only measure structured output: tok/s with a JSON-schema mask vs without (fp32)")
    parser.add_argument("--quantize", nargs="*", choices=METHODS, default=list(METHODS),
                        help="weight-only methods timed at batch 1 beside llama.cpp's Q8_0/Q4_0 (default both; "
                             "none given: skip)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default=None,
                        help="time a transformers model of this family at the same size (default: lmforge's tiny)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hide_third_party_noise()

    import transformers

    transformers.utils.logging.disable_progress_bar()

    scratch = tempfile.TemporaryDirectory()  # removed when the benchmark exits
    workdir = scratch.name
    config = write_model(args.family, args.prompt_len + args.new_tokens + 8, workdir + "/model", args.preset)
    prefix = f"{args.family}_" if args.family else "" if args.preset == "tiny" else f"{args.preset}_"

    if args.structured:
        rows = structured_rows(config, workdir, args)
        args.dtypes = []
    else:
        rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        engines = {"lmforge": serving_engine(workdir + "/model", dtype)}
        if args.compile:
            engines["lmforge compiled"] = serving_engine(workdir + "/model", dtype, compile=True)
        ref = transformers.AutoModelForCausalLM.from_pretrained(workdir + "/model", dtype=dtype).eval()
        for batch in args.batch_sizes:
            prompts = torch.randint(3, config.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
            params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)

            def run_ref() -> None:
                with torch.inference_mode():
                    ref.generate(
                        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                    )

            tokens = batch * args.new_tokens
            case = f"{prefix}decode_b{batch}_{'fp32' if dtype is torch.float32 else 'bf16'}"
            reference = tokens / time_call(run_ref, args.repeats)
            for label, engine in engines.items():
                ours = tokens / time_call(lambda: engine.generate(prompts.tolist(), params), args.repeats)
                rows.append((case + ("_compiled" if label != "lmforge" else ""), ours, reference))

    print(f"\n{'case':<32}{'lmforge tok/s':>15}{'transformers tok/s':>20}{'ratio':>8}")
    for name, a, b in rows:
        print(f"{name:<32}{a:>15.1f}{b:>20.1f}{a / b:>8.2f}")
    print()
    for name, a, b in rows:
        print(f"RESULT {name} lmforge={a:.1f} reference={b:.1f} unit=tok/s ratio={a / b:.2f}")
    if not args.structured and args.family is None:
        quantized = quantized_rows(config, workdir, args)
        llama_cpp_rows(config, workdir, args, {name.removeprefix(prefix): a for name, a, _ in rows}, quantized)

    if args.profile:
        profile_decode_step(serving_engine(workdir + "/model", torch.float32), config.vocab_size)


def structured_rows(config: ModelConfig, workdir: str, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(case, tok/s with a JSON-schema mask, tok/s without) per batch size, on a BPE tokenizer of the
    model's vocabulary size trained on JSON-like text."""
    from lmforge.generate.grammar import Grammar, GrammarCompiler
    from lmforge.tokenizer import train_tokenizer

    corpus = Path(workdir) / "corpus.txt"
    words = ["name", "city", "score", "alpha", "beta", "the", "cat", "sat", "on", "mat", "true", "false"]
    generator = torch.Generator().manual_seed(0)
    lines = [json.dumps({words[int(i)]: " ".join(words[int(j)] for j in torch.randint(0, 12, (8,), generator=generator))
                         for i in torch.randint(0, 12, (4,), generator=generator)}) for _ in range(20000)]
    corpus.write_text("\n".join(lines))
    tokenizer = train_tokenizer([corpus], config.vocab_size, Path(workdir) / "tok", show_progress=False)
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    compiler = GrammarCompiler(tokenizer, config.vocab_size, [tokenizer.eos_id])
    plain_engine = Engine(load_model(workdir + "/model", dtype=torch.float32))
    masked_engine = Engine(load_model(workdir + "/model", dtype=torch.float32), grammars=compiler)
    rows = []
    for batch in args.batch_sizes:
        prompts = torch.randint(3, config.vocab_size, (batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(batch)).tolist()
        plain = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
        masked = plain.model_copy(update={"grammar": Grammar.json_schema(schema)})
        assert all(len(r) == args.new_tokens for r in masked_engine.generate(prompts, masked))  # never ends early
        with_mask = batch * args.new_tokens / time_call(lambda: masked_engine.generate(prompts, masked), args.repeats)
        without = batch * args.new_tokens / time_call(lambda: plain_engine.generate(prompts, plain), args.repeats)
        rows.append((f"json_schema_mask_b{batch}_fp32", with_mask, without))
    print("(structured: 'lmforge' is with the JSON-schema mask, 'reference' the same engine without it)")
    return rows


def batch1_prompt(config: ModelConfig, args: argparse.Namespace) -> list[int]:
    """The batch-1 prompt every engine decodes after."""
    return torch.randint(3, config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()


def quantized_rows(config: ModelConfig, workdir: str, args: argparse.Namespace) -> dict[str, tuple[float, int]]:
    """engine ("int8", "int8 compiled", ...) -> (tok/s at batch 1, bytes of parameters and buffers) of lmforge's
    weight-only quantized engines, eager and (unless --no-compile) compiled; prints these with the share of greedy
    tokens equal to float32's at the same position, and of next tokens equal to float32's given float32's sequence
    (a divergence no longer shifts what follows)."""
    prompt = [batch1_prompt(config, args)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    reference = serving_engine(workdir + "/model", torch.float32).generate(prompt, params)[0]
    rows = {}
    for method, compile in [(m, c) for m in args.quantize for c in (False, True) if args.compile or not c]:
        model = load_model(workdir + "/model", dtype=torch.float32)
        fuse_projections(model)
        Quantization(method).apply(model)
        engine = Engine(model, compile=compile)
        same = sum(a == b for a, b in zip(engine.generate(prompt, params)[0], reference)) / len(reference)
        with torch.inference_mode():  # each next token given float32's text so far
            logits = model(torch.tensor([prompt[0] + reference]))[0, len(prompt[0]) - 1 : -1]
        forced = (logits.argmax(-1) == torch.tensor(reference)).float().mean().item()
        tok_s = args.new_tokens / time_call(lambda: engine.generate(prompt, params), args.repeats)
        size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        name = method + (" compiled" if compile else "")
        rows[name] = (tok_s, size)
        activations = "C step, float32 activations" if engine.native else "bfloat16 activations"
        print(f"lmforge {name} ({activations}), batch 1: {tok_s:.1f} tok/s, {size / 1e6:.1f} MB; of "
              f"{len(reference)} greedy tokens {same:.0%} as float32's, {forced:.0%} given float32's prefix")
    return rows


def read_bandwidth(mib: int = 512) -> float:
    """Bytes per second a reduction over a large tensor reads (what a decode step does to the weights),
    best of five."""
    src = torch.ones(mib * 2**20 // 4)
    return src.numel() * 4 / min(time_call(lambda: src.sum(), 1) for _ in range(5))


def llama_cpp_rows(config: ModelConfig, workdir: str, args: argparse.Namespace, ours: dict[str, float],
                   quantized: dict[str, tuple[float, int]]) -> None:
    """llama.cpp (llama-cpp-python) greedy batch-1 decoding of the same weights, exported by `lmforge export
    gguf` as f32 and f16 and quantized by llama.cpp to Q8_0 and Q4_0, against lmforge's fp32 and bf16 rows and
    its `quantized` ones (method -> tok/s, bytes); and each engine's share of the memory-bandwidth limit (weight
    bytes read per token x tok/s / the bandwidth a reduction over a large tensor reads)."""
    if importlib.util.find_spec("llama_cpp") is None:
        print("(llama.cpp rows need llama-cpp-python: pip install -e '.[test]')")
        return
    from lmforge.export.gguf import export_gguf
    from lmforge.tokenizer import train_tokenizer

    corpus = Path(workdir) / "words.txt"
    corpus.write_text(" ".join(f"w{i % 9973} x{i % 7919}" for i in range(200_000)))
    tokenizer = train_tokenizer([corpus], config.vocab_size, Path(workdir) / "tok", show_progress=False)
    tokenizer.save(workdir + "/model")
    files = {"f32": export_gguf(workdir + "/model", Path(workdir) / "f32.gguf", dtype="f32"),
             "f16": export_gguf(workdir + "/model", Path(workdir) / "f16.gguf", dtype="f16")}
    for name in ("q8_0", "q4_0"):
        files[name] = Path(workdir) / f"{name}.gguf"
        in_quiet_child(llama_cpp_quantize, str(files["f32"]), str(files[name]), name)
    prompt = batch1_prompt(config, args)
    speed = {name: llama_cpp_speed(path, prompt, args) for name, path in files.items()}
    retried = [name for name, tok_s in speed.items() if tok_s is None]
    speed |= {name: llama_cpp_speed(files[name], prompt, args, extra_buffers=False) for name in retried}
    note = (f"\n(llama.cpp crashed on {', '.join(retried)} with its extra buffer types, AMX kernels on this CPU: "
            "measured without them, so without AMX or weight repacking)" if retried else "")
    bandwidth = read_bandwidth()
    weights = {name: path.stat().st_size for name, path in files.items()}
    weights |= {"lmforge fp32": weights["f32"], "lmforge bf16": weights["f16"]}
    weights |= {f"lmforge {name}": size for name, (_, size) in quantized.items()}
    weights |= {"lmforge fp32 compiled": weights["f32"], "lmforge bf16 compiled": weights["f16"]}
    measured = {**{f"llama.cpp {k}": v for k, v in speed.items()},
                "lmforge fp32": ours.get("decode_b1_fp32"), "lmforge bf16": ours.get("decode_b1_bf16"),
                "lmforge fp32 compiled": ours.get("decode_b1_fp32_compiled"),
                "lmforge bf16 compiled": ours.get("decode_b1_bf16_compiled"),
                **{f"lmforge {name}": tok_s for name, (tok_s, _) in quantized.items()}}
    print(f"\nBatch 1, {args.new_tokens} greedy tokens; read bandwidth {bandwidth / 1e9:.1f} GB/s{note}\n")
    print(f"{'engine':<24}{'tok/s':>10}{'MB read per token':>20}{'share of bandwidth limit':>26}")
    for name, tok_s in measured.items():
        if tok_s is None:
            continue
        size = weights[name.removeprefix("llama.cpp ")] if name.startswith("llama.cpp") else weights[name]
        print(f"{name:<24}{tok_s:>10.1f}{size / 1e6:>20.1f}{tok_s * size / bandwidth:>26.0%}")
    for ours_name, theirs in (("lmforge fp32", "f32"), ("lmforge bf16", "f16"), ("lmforge fp32 compiled", "f32"),
                              ("lmforge bf16 compiled", "f16")):
        ours_tok_s, theirs_tok_s = measured[ours_name], speed[theirs]
        if ours_tok_s is not None and theirs_tok_s is not None:
            compiled = "_compiled" if ours_name.endswith("compiled") else ""
            print(f"RESULT llamacpp_{theirs}_b1{compiled} lmforge={ours_tok_s:.1f} reference={theirs_tok_s:.1f} "
                  f"unit=tok/s ratio={ours_tok_s / theirs_tok_s:.2f} ({ours_name} vs llama.cpp {theirs})")
    for name, (tok_s, _) in quantized.items():
        method, _, compiled = name.partition(" ")
        theirs = {"int8": "q8_0", "int4": "q4_0"}[method]
        if speed[theirs] is None:
            continue
        print(f"RESULT {method}_b1{'_compiled' if compiled else ''} lmforge={tok_s:.1f} reference={speed[theirs]:.1f} "
              f"unit=tok/s ratio={tok_s / speed[theirs]:.2f} (lmforge {name} vs llama.cpp {theirs})")


def in_quiet_child(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a child process whose C-level output is hidden, or None where the child crashed (some of
    llama.cpp's kernels crash on some CPUs: AMX)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=hide_output) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            return None


def hide_output() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)


def llama_cpp_quantize(source: str, target: str, ftype: str) -> None:
    """llama.cpp's quantization of the GGUF file `source` to `ftype` ("q8_0", "q4_0") at `target`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    llama_cpp.llama_model_quantize(source.encode(), target.encode(), params)


def llama_cpp_speed(path: Path, prompt: list[int], args: argparse.Namespace, extra_buffers: bool = True
                    ) -> float | None:
    """llama.cpp's greedy batch-1 tok/s on the GGUF file at `path`, or None where it crashed.
    `extra_buffers=False` loads the weights without llama.cpp's extra buffer types (AMX, repacked weights)."""
    return in_quiet_child(llama_cpp_decode_speed, str(path), prompt, args, torch.get_num_threads(), extra_buffers)


def llama_cpp_decode_speed(path: str, prompt: list[int], args: argparse.Namespace, threads: int,
                           extra_buffers: bool) -> float:
    """`llama_cpp_speed` in the child process: greedy decoding as the argmax of the last position's logits, fed back."""
    import llama_cpp
    import llama_cpp.llama

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def model_params() -> Any:  # llama_cpp.Llama takes no argument for this field
        params = defaults()
        params.use_extra_bufts = extra_buffers
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = model_params
    llm = llama_cpp.Llama(model_path=path, n_ctx=args.prompt_len + args.new_tokens + 8, n_threads=threads,
                          n_batch=args.prompt_len, verbose=False)

    def decode() -> None:
        llm.reset()
        llm.eval(prompt)
        for _ in range(args.new_tokens):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            llm.eval([int(logits.argmax())])

    return args.new_tokens / time_call(decode, args.repeats)


def profile_decode_step(engine: Engine, vocab: int) -> None:
    """Where one batch-1 decode step's time goes, by operator."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_new_tokens=40, temperature=0)
    stream = engine.stream([list(range(3, 19))], params)
    for _ in range(20):
        next(stream)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            next(stream)
    print("\nProfile of 10 decode steps at batch 1, fp32 (self CPU time by operator):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
