"""Journey 8, Plan compute, through the command line: `lmforge plan --preset llama2-7b --gpus 8 --gpu-mem 80
--strategy fsdp` (parameters, FLOPs, petaFLOP/s-days for a token budget, memory per GPU), a run that does
not fit, and `lmforge plan --flops 1e21` (the Chinchilla-optimal size and tokens). Every printed figure
is parsed back and checked against a value recomputed here from LLaMA-2-7B's architecture, the byte
accounting lmforge documents and Hoffmann et al.'s published law."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
from scipy.optimize import minimize_scalar

from lmforge.cli import main

GIB = 2**30
PETAFLOP_DAY = 1e15 * 86400
# LLaMA-2-7B (Touvron et al. 2023): untied embeddings, SwiGLU MLP, RMSNorm, no biases, 4096-token context.
VOCAB, HIDDEN, LAYERS, HEADS, FFN, CONTEXT = 32000, 4096, 32, 32, 11008, 4096
# Chinchilla approach 3 (Hoffmann et al. 2022): L(N, D) = E + A/N^alpha + B/D^beta.
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
PREFIX = {"": 1.0, "k": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
BYTE_UNITS = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def number(text: str) -> float:
    return float(text.replace(",", ""))


def parse(text: str) -> tuple[float, float]:
    """'6.74 B', '46.1 GFLOP', '2 GiB', '1,067' -> (the printed number, what its unit multiplies it by)."""
    match = re.fullmatch(r"([\d.,e+-]+) ?(KiB|MiB|GiB|bytes|[kMBGTPE]?)(?:FLOP(?:/s)?)?", text.strip())
    assert match, text
    value, unit = match.groups()
    return number(value), BYTE_UNITS[unit] if unit in BYTE_UNITS else PREFIX[unit]


def assert_shows(text: str, expected: float, *, significant: int | None = None, decimals: int | None = None,
                 unit: float = 1.0) -> None:
    """`text` is `expected` in its unit (times `unit`), rounded to `significant` digits or `decimals` places."""
    printed, factor = parse(text)
    value = expected / (factor * unit)
    if significant is not None:
        ulp = 10.0 ** (math.floor(math.log10(abs(value))) - significant + 1)
    else:
        ulp = 10.0**-decimals
    assert abs(printed - value) <= ulp / 2 * (1 + 1e-9), (text, value)


def field(text: str, pattern: str) -> tuple[str, ...]:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{pattern!r} not in\n{text}"
    return match.groups()


# ---- LLaMA-2-7B by hand ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Oracle:
    """LLaMA-2-7B's counts, FLOPs and memory for one run, from the architecture alone."""

    gpus: int
    gpu_mem_gib: float
    tokens: float | None = None
    seq: int = CONTEXT
    micro_batch: int = 1
    lora_rank: int = 8

    head_dim = HIDDEN // HEADS
    attention_matrices = 4 * HIDDEN * HIDDEN  # q, k, v, o: as many KV heads as query heads
    mlp_matrices = 3 * HIDDEN * FFN  # gate, up, down
    block = attention_matrices + mlp_matrices + 2 * HIDDEN  # two RMSNorm gains
    embedding = 2 * VOCAB * HIDDEN  # input embeddings and the untied output head
    params = embedding + LAYERS * block + HIDDEN  # final norm

    @property
    def train_tokens(self) -> float:
        return self.tokens if self.tokens is not None else 20 * self.params

    @property
    def matmul_params(self) -> int:
        """The weights every token is multiplied by: the blocks' matrices and the output head (no
        norm gains; the embedding lookup is no matmul)."""
        return LAYERS * (self.attention_matrices + self.mlp_matrices) + VOCAB * HIDDEN

    @property
    def attention_flops(self) -> int:
        """PaLM (Chowdhery et al. 2022, appendix B): 12 x layers x heads x head_dim x sequence per token."""
        return 12 * LAYERS * HEADS * self.head_dim * self.seq

    @property
    def flops_per_token(self) -> int:
        return 6 * self.matmul_params + self.attention_flops

    @property
    def total_flops(self) -> float:
        return self.flops_per_token * self.train_tokens

    def memory(self) -> dict[str, dict[str, float]]:
        """Bytes per device under lmforge's documented accounting: bf16 weights 2 + bf16 grads 2 + fp32
        master, m and v 12 per parameter, all three divided by the devices under FSDP, which also holds
        one unit (a block, or embeddings + head + final norm) unsharded in bf16 weights and gradients;
        QLoRA keeps the blocks' linear weights in double-quantised NF4 and trains rank-r adapters."""
        s, b, h = self.seq, self.micro_batch, HIDDEN
        activations = LAYERS * s * b * h * 34  # Korthikanti et al. 2022, selective recomputation
        logits = 4 * s * b * VOCAB
        largest_unit = max(self.block, self.embedding + HIDDEN)
        linear = LAYERS * (self.attention_matrices + self.mlp_matrices)
        lora = LAYERS * self.lora_rank * (4 * (HIDDEN + HIDDEN) + 3 * (HIDDEN + FFN))
        nf4 = (4 + 8 / 64 + 32 / (64 * 256)) / 8
        rows = {
            "ddp": dict(weights=2 * self.params, gradients=2 * self.params, optimizer=12 * self.params, gathered=0),
            "fsdp": dict(weights=2 * self.params / self.gpus, gradients=2 * self.params / self.gpus,
                         optimizer=12 * self.params / self.gpus, gathered=4 * largest_unit if self.gpus > 1 else 0),
            "qlora": dict(weights=nf4 * linear + 2 * (self.params - linear) + 2 * lora, gradients=2 * lora,
                          optimizer=12 * lora, gathered=0),
        }
        for row in rows.values():
            row.update(activations=activations, logits=logits)
            row["total"] = sum(row.values())
        return rows

    def activations_by_recompute(self) -> dict[str, float]:
        s, b, h = self.seq, self.micro_batch, HIDDEN
        return {"none": LAYERS * s * b * h * (34 + 5 * HEADS * s / h), "selective": LAYERS * s * b * h * 34,
                "full": LAYERS * 2 * s * b * h + s * b * h * 34}

    @property
    def kv_cache_per_token(self) -> int:
        return 2 * LAYERS * HEADS * self.head_dim * 2  # K and V, bf16


def test_llama2_7b_architecture_gives_its_published_parameter_count():
    assert Oracle(gpus=1, gpu_mem_gib=80).params == 6_738_415_616


# ---- the plan's text --------------------------------------------------------------------------------


def memory_table(text: str) -> tuple[float, str, dict[str, dict[str, str]]]:
    """(unit in bytes, the starred strategy, {row label: {strategy: cell}}) of the memory table."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Memory per device, "))
    unit = BYTE_UNITS[field(lines[start], r"^Memory per device, (\w+) ")[0]]
    header = re.findall(r"([A-Z]+)( \*)?", lines[start + 1])
    columns = [name.lower() for name, _ in header]
    starred = [name.lower() for name, star in header if star]
    assert len(starred) == 1 and columns == ["ddp", "fsdp", "qlora"]
    rows = {}
    for line in lines[start + 2 :]:
        match = re.fullmatch(r"  (\S.*?)\s{2,}(\S+)\s+(\S+)\s+(\S+)", line)
        if not match:
            break
        rows[match.group(1)] = dict(zip(columns, match.groups()[1:]))
    return unit, starred[0], rows


def check_plan(text: str, run: Oracle, strategy: str) -> dict[str, bool]:
    """Every figure of `lmforge plan --preset llama2-7b` against `run`; returns the printed verdicts."""
    assert field(text, r"^llama2-7b: llama, (\d+) layers, hidden (\d+), (\d+) heads, vocab (\d+)$") == tuple(
        map(str, (LAYERS, HIDDEN, HEADS, VOCAB)))
    total, embedding, non_embedding = field(text, r"parameters +(.+?) \(embedding (.+?), non-embedding (.+?)\)")
    assert_shows(total, run.params, significant=3)
    assert_shows(embedding, run.embedding, significant=3)
    assert_shows(non_embedding, run.params - run.embedding, significant=3)

    assert field(text, r"^Training compute \(sequence (\d+)\)$") == (str(run.seq),)
    per_token, matmul, attention, six_n = field(
        text, r"per token +(.+?) = 6 x (.+?) matmul parameters \+ (.+?) attention \(PaLM\); 6N = (.+)$")
    assert_shows(per_token, run.flops_per_token, significant=3)
    assert_shows(matmul, run.matmul_params, significant=3)
    assert_shows(attention, run.attention_flops, significant=3)
    assert_shows(six_n, 6 * run.params, significant=3)
    tokens, source = field(text, r"^  tokens +(.+?) \((.+)\)$")
    assert_shows(tokens, run.train_tokens, significant=3)
    assert source == ("--tokens" if run.tokens is not None else "20 per parameter, Chinchilla's rule")
    flops, pf_days, six_nd = field(text, r"total +(\S+) FLOPs = (\S+) petaFLOP/s-days \(6ND = (\S+)\)")
    assert_shows(flops, run.total_flops, significant=3)
    assert_shows(pf_days, run.total_flops / PETAFLOP_DAY, significant=4)
    assert_shows(six_nd, 6 * run.params * run.train_tokens, significant=3)
    days, gpus = field(text, r"time +(\S+) days on (\d+) GPUs? at 40% MFU of 312 TFLOP/s each")
    assert int(gpus) == run.gpus
    assert_shows(days, run.total_flops / (run.gpus * 312e12 * 0.4) / 86400, decimals=1)

    unit, starred, rows = memory_table(text)
    assert starred == strategy
    expected = run.memory()
    labels = {"weights": "weights", "gradients": "gradients", "AdamW states (fp32 master, m, v)": "optimizer",
              "FSDP gathered unit": "gathered", "activations (selective recompute)": "activations",
              "logits (fp32, for the loss)": "logits", "total": "total"}
    assert set(rows) == {*labels, "fits"}
    for label, key in labels.items():
        for name, cell in rows[label].items():
            value = expected[name][key]
            if cell == "-":
                assert value == 0, (label, name)
            else:
                assert_shows(cell, value, decimals=2, unit=unit)
    verdicts = {name: cell == "yes" for name, cell in rows["fits"].items()}
    assert set(rows["fits"].values()) <= {"yes", "NO"}
    assert verdicts == {name: row["total"] <= run.gpu_mem_gib * GIB for name, row in expected.items()}

    by_recompute = dict(re.findall(r"(\w+) ([\d.]+ \w+)", field(text, r"activations by recompute: (.+?) \(")[0]))
    for name, value in run.activations_by_recompute().items():
        assert_shows(by_recompute[name], value, significant=3)

    weights, cache, per_token_cache, verdict = field(
        text, r"bf16 weights (.+?) \+ KV cache (.+?) \((.+?) per token, 1 x \d+ tokens\) = .+?, (fits|does NOT fit)$")
    inference = 2 * run.params + run.kv_cache_per_token * run.seq
    assert_shows(weights, 2 * run.params, significant=3)
    assert_shows(cache, run.kv_cache_per_token * run.seq, significant=3)
    assert parse(per_token_cache) == (run.kv_cache_per_token / 2**10, 2**10)
    assert (verdict == "fits") == (inference <= run.gpu_mem_gib * GIB)
    return verdicts


def run_plan(capsys, *args: str) -> str:
    assert main(["plan", *args]) == 0
    return capsys.readouterr().out


def test_plan_llama2_7b_on_eight_gpus_with_fsdp(capsys):
    text = run_plan(capsys, "--preset", "llama2-7b", "--gpus", "8", "--gpu-mem", "80", "--strategy", "fsdp",
                    "--tokens", "2e12")
    print(text)
    verdicts = check_plan(text, Oracle(gpus=8, gpu_mem_gib=80, tokens=2e12), "fsdp")
    assert verdicts["fsdp"] and not verdicts["ddp"]


def test_plan_that_does_not_fit_one_small_gpu(capsys):
    text = run_plan(capsys, "--preset", "llama2-7b", "--gpus", "1", "--gpu-mem", "16", "--strategy", "ddp")
    verdicts = check_plan(text, Oracle(gpus=1, gpu_mem_gib=16), "ddp")
    assert verdicts == {"ddp": False, "fsdp": False, "qlora": False}


# ---- the compute-optimal size -------------------------------------------------------------------------


def chinchilla_loss(params: float, tokens: float) -> float:
    return E + A / params**ALPHA + B / tokens**BETA


def law_optimum(flops: float) -> float:
    """N minimising L(N, C / 6N), found numerically."""
    best = minimize_scalar(lambda log_n: chinchilla_loss(math.exp(log_n), flops / (6 * math.exp(log_n))),
                           bounds=(math.log(1e6), math.log(1e13)), method="bounded", options={"xatol": 1e-10})
    return math.exp(best.x)


def test_plan_compute_optimal_size_for_1e21_flops(capsys):
    flops = 1e21
    text = run_plan(capsys, "--flops", "1e21")
    print(text)
    budget, pf_days = field(text, r"^Compute budget C = (\S+) FLOPs \((\S+) petaFLOP/s-days\), C = 6ND$")
    assert number(budget) == flops
    assert_shows(pf_days, flops / PETAFLOP_DAY, significant=4)
    assert tuple(map(float, field(
        text, r"L\(N, D\) = (\S+) \+ (\S+)/N\^(\S+) \+ (\S+)/D\^(\S+) \(Chinchilla approach 3")
    )) == (E, A, ALPHA, B, BETA)

    n_opt = law_optimum(flops)
    exponent = math.log(law_optimum(1e23) / law_optimum(1e19)) / math.log(1e4)  # N_opt ∝ C^a
    g, a, b, g_again = field(text, r"N_opt = (\S+) \(C/6\)\^(\S+), D_opt = \(C/6\)\^(\S+) / (\S+)$")
    assert g == g_again
    assert_shows(a, exponent, decimals=3)
    assert_shows(b, 1 - exponent, decimals=3)
    assert_shows(g, n_opt / (flops / 6) ** exponent, significant=4)

    rule_n = math.sqrt(flops / (6 * 20))  # D = 20 N and C = 6 N D
    rows = {"law minimum": (n_opt, flops / (6 * n_opt)), "20 tokens/parameter": (rule_n, 20 * rule_n)}
    losses = {}
    for label, (n, d) in rows.items():
        params, tokens, ratio, loss = field(text, rf"^{label} +(\S+ \w) +(\S+ \w) +(\S+) +(\S+)$")
        assert_shows(params, n, significant=3)
        assert_shows(tokens, d, significant=3)
        assert_shows(ratio, d / n, decimals=1)
        assert_shows(loss, chinchilla_loss(n, d), decimals=3)
        losses[label] = number(loss)
    assert losses["law minimum"] <= losses["20 tokens/parameter"]  # as printed: the law's optimum is no worse


@pytest.mark.parametrize("args", [["--flops", "0"], ["--flops", "1e21", "num_hidden_layers=2"]])
def test_plan_rejects_a_meaningless_budget(capsys, args):
    assert main(["plan", *args]) == 2
    assert "flops" in capsys.readouterr().err
