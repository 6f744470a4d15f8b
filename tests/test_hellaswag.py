"""HellaSwag scoring: batched evaluator against a naive one-example scorer, ours against `transformers`, 2 ranks."""

import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import hellaswag
from gpt2repro.checkpoint import load_model, model_checkpoint_fields, save_checkpoint
from gpt2repro.tokenizer import get_tokenizer, gpt2_encoding, gpt2_ranks_path
from model import GPT, GPTConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the man woman dog ball kitchen knife water slowly then carefully jumps runs pours cuts onto into over "
         "a his her bowl field rope bike ladder paint wall brush smiles, laughs. Next; 3 cups (and) pan").split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_examples(n: int, seed: int = 0, ctx_words: tuple[int, int] = (1, 30)) -> list[dict]:
    """Examples in the dataset's own format, with contexts and endings of varied lengths."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ctx_a, ctx_b = sentence(rng, ctx_words[0], ctx_words[1]), sentence(rng, 0, 4)
        out.append({
            "ind": 1000 + i, "activity_label": "Cooking", "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": (ctx_a + " " + ctx_b).strip(), "endings": [sentence(rng, 1, 14) for _ in range(4)],
            "label": rng.randrange(4), "split": "val", "split_type": "indomain", "source_id": f"src~{i}",
        })
    return out


def write_jsonl(path, examples) -> str:
    path.write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    return str(path)


def tiny_gpt(vocab: int = 50257, block_size: int = 128, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # random init leaves LayerNorms/biases trivial; perturb so everything matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def naive_scores(model, examples, vocab: int = 50257, crop_to: int | None = None, block_size: int | None = None):
    """One forward per ending over context + ending, full logits, float64 cross-entropy: the reference protocol
    written out plainly. `block_size` drops the oldest context tokens until the longest row fits (as the
    evaluator does); `crop_to` instead crops each row on its own."""
    enc = gpt2_encoding()
    out = []
    for ex in examples:
        ctx = enc.encode_ordinary(ex["ctx"])
        endings = [enc.encode_ordinary(" " + ending) for ending in ex["endings"]]
        if block_size is not None:
            while ctx and len(ctx) + max(len(e) for e in endings) > block_size:
                ctx = ctx[1:]
        sums, means = [], []
        for end in endings:
            row = ctx + end
            n_ctx = len(ctx)
            if crop_to is not None and len(row) > crop_to:
                row, n_ctx = row[len(row) - crop_to :], n_ctx - (len(row) - crop_to)
            with torch.no_grad():
                logits = model(torch.tensor([row]))
                logits = logits[0] if isinstance(logits, tuple) else logits.logits
            first = max(n_ctx, 1)  # a token with nothing before it has no prediction
            losses = F.cross_entropy(logits[0, first - 1 : -1, :vocab].double(), torch.tensor(row[first:]),
                                     reduction="none")
            sums.append(losses.sum().item())
            means.append(losses.mean().item())
        out.append((sums, means))
    return out


def assert_matches_naive(result, naive, tol=1e-5):
    assert len(result["predictions"]) == len(naive)
    for p, (sums, means) in zip(result["predictions"], naive, strict=True):
        assert p["pred"] == min(range(4), key=lambda k: sums[k])
        assert p["pred_norm"] == min(range(4), key=lambda k: means[k])
        assert max(abs(a - b) for a, b in zip(p["sum_loss"], sums, strict=True)) <= tol
        assert max(abs(a - b) for a, b in zip(p["mean_loss"], means, strict=True)) <= tol


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread only adds synchronisation (7x the CPU time on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def examples():
    return make_examples(23)


@pytest.fixture(scope="module")
def model():
    return tiny_gpt()


@pytest.fixture(scope="module")
def naive(model, examples):
    return naive_scores(model, examples)


# -----------------------------------------------------------------------------
# scoring


def test_render_example_rows_and_mask(examples):
    enc = gpt2_encoding()
    ex = examples[0]
    tokens, mask, label = hellaswag.render_example(ex, get_tokenizer("gpt2"))
    ctx = enc.encode_ordinary(ex["ctx"])
    assert label == ex["label"] and tokens.shape == mask.shape and tokens.size(0) == 4
    for i, ending in enumerate(ex["endings"]):
        end = enc.encode_ordinary(" " + ending)
        assert tokens[i, : len(ctx) + len(end)].tolist() == ctx + end
        assert tokens[i, len(ctx) + len(end) :].eq(0).all()
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (tokens.size(1) - len(ctx) - len(end))


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_batched_matches_naive(model, examples, naive, batch_size):
    result = hellaswag.evaluate(model, examples, batch_size=batch_size)
    assert_matches_naive(result, naive)
    labels = [ex["label"] for ex in examples]
    assert result["num_total"] == len(examples)
    assert result["num_correct"] == sum(p["pred"] == y for p, y in zip(result["predictions"], labels, strict=True))
    assert result["num_correct_norm"] == sum(p["pred_norm"] == y
                                             for p, y in zip(result["predictions"], labels, strict=True))
    assert result["acc_norm"] == result["num_correct_norm"] / len(examples)
    assert [p["index"] for p in result["predictions"]] == list(range(len(examples)))


def mixed_examples(n: int, seed: int) -> list[dict]:
    """Short, long and empty contexts: with block_size 64 some rows fill the window and some contexts are cropped."""
    rng = random.Random(seed)
    out = make_examples(n, seed=seed, ctx_words=(0, 45))
    for ex in rng.sample(out, n // 20):
        ex["ctx"] = ""
    return out


@pytest.fixture(scope="module")
def mixed():
    """A model with a 64-token window, 300 examples for it, and their naive scores."""
    model, examples = tiny_gpt(block_size=64, seed=2), mixed_examples(300, seed=5)
    return model, examples, naive_scores(model, examples, block_size=64)


def test_mixed_examples_cover_empty_cropped_and_full_windows(mixed):
    enc = gpt2_encoding()
    _, examples, _ = mixed
    fill = [len(enc.encode_ordinary(ex["ctx"])) + max(len(enc.encode_ordinary(" " + e)) for e in ex["endings"])
            for ex in examples]
    assert sum(ex["ctx"] == "" for ex in examples) >= 10
    assert sum(f == 64 for f in fill) >= 3 and sum(f > 64 for f in fill) >= 10  # full as is / after cropping


@pytest.mark.parametrize("batch_tokens,batch_size", [(64, None), (700, None), (100_000, None), (4096, 3)])
def test_packed_matches_naive_on_many_mixed_examples(mixed, batch_tokens, batch_size):
    model, examples, naive = mixed
    result = hellaswag.evaluate(model, examples, batch_size=batch_size, batch_tokens=batch_tokens)
    assert_matches_naive(result, naive)


def test_pack_rows_places_every_unit_once_within_limits():
    rng = np.random.default_rng(0)
    unit_len = rng.integers(1, 300, size=500)
    for per_row, row_tokens, max_units in ((500, 256, None), (1, 0, None), (500, 256, 7)):
        row_of, col_of, batch_start = hellaswag.pack_rows(unit_len, 2048, row_tokens, per_row, max_units)
        assert batch_start[0] == 0 and batch_start[-1] == row_of.max() + 1
        for a, b in zip(batch_start, batch_start[1:], strict=False):
            units = np.flatnonzero((row_of >= a) & (row_of < b))
            width = max(row_tokens, unit_len[units].max())
            assert (b - a) * width <= 2048 or b - a == 1
            assert max_units is None or len(units) <= max_units
            for r in range(a, b):  # units of a row side by side, without overlap, within the width
                in_row = sorted(np.flatnonzero(row_of == r), key=lambda u: col_of[u])
                ends = [col_of[u] + unit_len[u] for u in in_row]
                assert col_of[in_row[0]] == 0 and ends[-1] <= width and len(in_row) <= per_row
                assert all(col_of[v] == e for v, e in zip(in_row[1:], ends, strict=False))
    row_of, _, batch_start = hellaswag.pack_rows(unit_len, 2048, 256, 500)
    assert unit_len.sum() / (256 * batch_start[-1]) > 0.9  # rows nearly full


def test_generic_path_matches_naive(model, examples, naive):
    """A model that is not our GPT is scored through the logits its forward returns."""

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, idx):
            return self.inner(idx)

    result = hellaswag.evaluate(LogitsOnly(model), examples[:8], batch_size=3)
    assert_matches_naive(result, naive[:8])


def test_empty_context_matches_naive(model, examples):
    """Nothing to share: the first ending token has no prediction and is left out, as in the reference."""
    mixed = [dict(examples[0], ctx="")] + examples[1:4]
    result = hellaswag.evaluate(model, mixed, batch_size=4)
    assert_matches_naive(result, naive_scores(model, mixed))


def test_padded_vocab_scores_only_tokenizer_ids(examples):
    model = tiny_gpt(vocab=50304)
    with torch.no_grad():  # give the 47 padding ids large logits: they must not enter the softmax
        model.lm_head.weight[50257:] = torch.randn(47, 32) * 3.0
    result = hellaswag.evaluate(model, examples[:6], batch_size=4)
    assert_matches_naive(result, naive_scores(model, examples[:6], vocab=50257))
    full_vocab = naive_scores(model, examples[:6], vocab=50304)
    assert abs(result["predictions"][0]["sum_loss"][0] - full_vocab[0][0][0]) > 1e-2


def test_context_cropped_to_block_size(examples):
    model = tiny_gpt(block_size=24)
    long = make_examples(6, seed=3, ctx_words=(20, 40))
    result = hellaswag.evaluate(model, long, batch_size=4)
    # the same oldest context tokens are dropped from all 4 rows, so the longest row is exactly 24 tokens
    enc = gpt2_encoding()
    for ex, p in zip(long, result["predictions"], strict=True):
        longest = max(len(enc.encode_ordinary(" " + e)) for e in ex["endings"])
        ctx = enc.encode_ordinary(ex["ctx"])[-(24 - longest) :]
        cropped = dict(ex, ctx=enc.decode(ctx))
        if enc.encode_ordinary(cropped["ctx"]) != ctx:
            continue  # the cropped tokens do not survive a decode/encode round trip
        ref = naive_scores(model, [cropped])[0]
        assert max(abs(a - b) for a, b in zip(p["sum_loss"], ref[0], strict=True)) <= 1e-5


def test_ours_and_transformers_give_same_predictions(tmp_path, examples):
    from transformers import GPT2Config, GPT2LMHeadModel  # here, not at the top: spawned ranks import this file

    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)
    ours, tokenizer = load_model(str(tmp_path))
    a = hellaswag.evaluate(ours.eval(), examples, tokenizer, batch_size=8)
    b = hellaswag.evaluate(hf, examples, tokenizer, batch_size=8)
    assert [p["pred"] for p in a["predictions"]] == [p["pred"] for p in b["predictions"]]
    assert [p["pred_norm"] for p in a["predictions"]] == [p["pred_norm"] for p in b["predictions"]]
    for pa, pb in zip(a["predictions"], b["predictions"], strict=True):
        assert max(abs(x - y) for x, y in zip(pa["sum_loss"], pb["sum_loss"], strict=True)) <= 1e-4


def test_bf16_autocast_close_to_fp32(model, examples, naive):
    result = hellaswag.evaluate(model, examples[:8], batch_size=8, dtype=torch.bfloat16)
    for p, (sums, _) in zip(result["predictions"], naive, strict=False):
        assert max(abs(a - b) / b for a, b in zip(p["sum_loss"], sums, strict=True)) <= 2e-2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
def test_restores_training_mode_and_unwraps(model, examples, naive):
    class Wrapper(torch.nn.Module):  # stands in for DDP's `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    model.train()
    result = hellaswag.evaluate(Wrapper(model), examples[:4], batch_size=2)
    assert model.training
    model.eval()
    assert_matches_naive(result, naive[:4])
    compiled = torch.compile(model)  # never run: evaluate takes the module under it
    assert_matches_naive(hellaswag.evaluate(compiled, examples[:4], batch_size=2), naive[:4])


def test_char_tokenizer_refused(model, examples):
    with pytest.raises(hellaswag.HellaSwagError, match="GPT-2 tokenizer"):
        hellaswag.evaluate(model, examples[:2], get_tokenizer("char", text="abc "))


def test_unlabelled_examples_predicted_not_counted(model, examples):
    unlabelled = [{k: v for k, v in ex.items() if k != "label"} for ex in examples[:3]]
    result = hellaswag.evaluate(model, unlabelled + examples[3:5])
    assert result["num_total"] == 2 and len(result["predictions"]) == 5


# -----------------------------------------------------------------------------
# 2 ranks over gloo


def _rank_main(rank: int, init_file: str, examples: list[dict], out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = hellaswag.evaluate(tiny_gpt(), examples, batch_size=4, rank=rank, world_size=2)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


def test_two_rank_gloo_matches_one_process(tmp_path, model, examples):
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), examples, str(tmp_path)), nprocs=2, join=True)
    single = hellaswag.evaluate(model, examples, batch_size=4)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    keys = ("num_correct", "num_correct_norm", "num_total", "acc", "acc_norm")
    for r in ranks:
        assert {k: r[k] for k in keys} == {k: single[k] for k in keys}
    shards = sorted(ranks[0]["predictions"] + ranks[1]["predictions"], key=lambda p: p["index"])
    assert len(ranks[0]["predictions"]) == 12 and len(ranks[1]["predictions"]) == 11
    assert [(p["pred"], p["pred_norm"]) for p in shards] == [(p["pred"], p["pred_norm"])
                                                            for p in single["predictions"]]
    for a, b in zip(shards, single["predictions"], strict=True):
        assert max(abs(x - y) for x, y in zip(a["sum_loss"], b["sum_loss"], strict=True)) <= 1e-5


def test_world_size_without_process_group_refused(model, examples):
    with pytest.raises(ValueError, match="process group"):
        hellaswag.evaluate(model, examples, rank=1, world_size=2)


# -----------------------------------------------------------------------------
# data and command line


def test_load_examples_from_jsonl_and_limit(tmp_path, examples):
    path = write_jsonl(tmp_path / "hs.jsonl", examples)
    assert hellaswag.load_examples(jsonl=path) == examples
    assert hellaswag.load_examples(jsonl=path, limit=5) == examples[:5]


def test_cached_split_is_read_without_download(tmp_path, examples, monkeypatch):
    write_jsonl(tmp_path / "hellaswag_val.jsonl", examples)
    monkeypatch.setattr(hellaswag, "DATA_URL", "file:///nonexistent/{split}")
    assert hellaswag.load_examples("val", data_dir=tmp_path, limit=3) == examples[:3]


def test_download_goes_to_data_dir(tmp_path, examples, monkeypatch):
    src = tmp_path / "remote"
    src.mkdir()
    write_jsonl(src / "hellaswag_train.jsonl", examples)
    monkeypatch.setattr(hellaswag, "DATA_URL", f"file://{src}/hellaswag_{{split}}.jsonl")
    got = hellaswag.load_examples("train", data_dir=tmp_path / "cache")
    assert got == examples and (tmp_path / "cache" / "hellaswag_train.jsonl").is_file()


def test_offline_without_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(hellaswag, "DATA_URL", "file:///nonexistent/hellaswag_{split}.jsonl")
    with pytest.raises(hellaswag.HellaSwagError) as e:
        hellaswag.load_examples("val", data_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "hellaswag_val.jsonl") in msg and "--jsonl" in msg
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("bad,needle", [
    ("{not json", "not valid JSON"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 0}', "'endings'"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 7}', "'label'"),
    ('{"endings": ["b", "c", "d", "e"], "label": 1}', "'ctx'"),
])
def test_malformed_line_names_file_and_line(tmp_path, examples, bad, needle):
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(examples[0]) + "\n" + json.dumps(examples[1]) + "\n" + bad + "\n")
    with pytest.raises(hellaswag.HellaSwagError, match=needle) as e:
        hellaswag.load_examples(jsonl=path)
    assert str(e.value).startswith(f"{path}:3:")


def test_cli_on_checkpoint_prints_metrics_and_references(tmp_path, model, examples, capsys):
    ckpt = tmp_path / "ckpt_0000010.pt"
    save_checkpoint(model_checkpoint_fields(model, get_tokenizer("gpt2")), ckpt)
    data = write_jsonl(tmp_path / "hs.jsonl", examples)
    preds = tmp_path / "preds.jsonl"
    hellaswag.main(["--model", str(ckpt), "--jsonl", data, "--limit", "10", "--batch_size", "4", "--device", "cpu",
                    "--predictions", str(preds)])
    out = capsys.readouterr().out
    expected = hellaswag.evaluate(model, examples[:10], batch_size=4)
    assert f"acc      {expected['acc']:.4f}" in out and f"acc_norm {expected['acc_norm']:.4f}" in out
    assert "0.2955" in out and "31.14" in out and "50.89" in out and "Harness" in out
    written = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [p["pred"] for p in written] == [p["pred"] for p in expected["predictions"]]


def test_cli_char_checkpoint_is_a_clear_error(tmp_path, examples):
    torch.manual_seed(0)
    tok = get_tokenizer("char", text="abcdefgh ")
    char_model = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8))
    ckpt = tmp_path / "ckpt_0000001.pt"
    save_checkpoint(model_checkpoint_fields(char_model, tok), ckpt)
    data = write_jsonl(tmp_path / "hs.jsonl", examples[:2])
    with pytest.raises(SystemExit) as e:
        hellaswag.main(["--model", str(ckpt), "--jsonl", data, "--device", "cpu"])
    assert str(e.value).startswith("error:") and "char" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("flag", ["--batch_tokens", "--batch_size", "--limit"])
def test_cli_bad_size_is_a_one_line_error(flag):
    with pytest.raises(SystemExit) as e:
        hellaswag.main(["--jsonl", "unused.jsonl", flag, "0"])
    assert str(e.value) == f"error: {flag} must be at least 1"


def test_nan_when_nothing_labelled(model, examples):
    result = hellaswag.evaluate(model, [{k: v for k, v in examples[0].items() if k != "label"}])
    assert math.isnan(result["acc"]) and result["num_total"] == 0


@pytest.mark.parametrize("options", [{"pos": "rope"}, {"pos": "rope", "qk_norm": True, "logit_softcap": 10.0,
                                                       "norm": "rmsnorm", "mlp": "relu2", "tie_embeddings": False}])
def test_packed_scoring_with_model_options_matches_naive(examples, options):
    """Packed rows restart positions per example: rotary angles must follow them as wpe does."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=2, n_head=2, n_embd=32, **options)).eval()
    assert_matches_naive(hellaswag.evaluate(model, examples, batch_size=8), naive_scores(model, examples))


def test_line_that_is_not_utf8_names_file_and_line(tmp_path, examples):
    path = tmp_path / "hs.jsonl"
    path.write_bytes((json.dumps(examples[0]) + "\n" + json.dumps(examples[1]) + "\n").encode()
                     + b'{"ctx": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(hellaswag.HellaSwagError) as e:
        hellaswag.load_examples(jsonl=path)
    assert str(e.value).startswith(f"{path}:3: not UTF-8 text") and "\n" not in str(e.value)


@pytest.fixture
def cli_checkpoint(tmp_path, model, examples, monkeypatch):
    """A checkpoint and a jsonl for the CLI; evaluation fails the test if it is reached."""
    ckpt = tmp_path / "ckpt_0000010.pt"
    save_checkpoint(model_checkpoint_fields(model, get_tokenizer("gpt2")), ckpt)

    def not_reached(*args, **kwargs):
        raise AssertionError("the evaluation ran before the bad --predictions was refused")

    monkeypatch.setattr(hellaswag, "evaluate", not_reached)
    return ["--model", str(ckpt), "--jsonl", write_jsonl(tmp_path / "hs.jsonl", examples), "--limit", "2",
            "--device", "cpu"]


def test_cli_refuses_to_replace_existing_predictions_before_scoring(tmp_path, cli_checkpoint):
    preds = tmp_path / "preds.jsonl"
    preds.write_text("an earlier run's predictions\n")
    with pytest.raises(SystemExit) as e:
        hellaswag.main(cli_checkpoint + ["--predictions", str(preds)])
    assert str(e.value) == f"error: --predictions {preds} already exists; delete it or pick another path"
    assert preds.read_text() == "an earlier run's predictions\n"


def test_cli_predictions_inside_a_file_is_one_line_before_scoring(tmp_path, cli_checkpoint):
    (tmp_path / "notes").write_text("a file, not a directory")
    preds = tmp_path / "notes" / "preds.jsonl"
    with pytest.raises(SystemExit) as e:
        hellaswag.main(cli_checkpoint + ["--predictions", str(preds)])
    assert str(e.value) == (f"error: --predictions {preds} is inside {tmp_path / 'notes'}, which is a file, not a "
                            "directory; pick another --predictions")


def test_cli_failed_predictions_write_is_one_line_after_the_scores(tmp_path, model, examples, monkeypatch, capsys):
    """A write that fails after the checks (a full disk, say): the scores are printed all the same."""
    ckpt = tmp_path / "ckpt_0000010.pt"
    save_checkpoint(model_checkpoint_fields(model, get_tokenizer("gpt2")), ckpt)

    def disk_full(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(hellaswag, "atomic_create_bytes", disk_full)
    preds = tmp_path / "preds.jsonl"
    with pytest.raises(SystemExit) as e:
        hellaswag.main(["--model", str(ckpt), "--jsonl", write_jsonl(tmp_path / "hs.jsonl", examples), "--limit", "2",
                        "--device", "cpu", "--predictions", str(preds)])
    assert str(e.value).startswith(f"error: {preds}: No space left on device; free disk space")
    assert "acc_norm" in capsys.readouterr().out


def test_predictions_file_made_while_scoring_is_kept(tmp_path, model, examples, monkeypatch, capsys):
    """--predictions is checked before scoring; a file that appears there meanwhile (another run) is not replaced."""
    ckpt = tmp_path / "ckpt_0000010.pt"
    save_checkpoint(model_checkpoint_fields(model, get_tokenizer("gpt2")), ckpt)
    preds = tmp_path / "preds.jsonl"
    evaluate = hellaswag.evaluate

    def another_run_writes_meanwhile(*args, **kwargs):
        preds.write_text("another run's predictions\n")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(hellaswag, "evaluate", another_run_writes_meanwhile)
    with pytest.raises(SystemExit) as e:
        hellaswag.main(["--model", str(ckpt), "--jsonl", write_jsonl(tmp_path / "hs.jsonl", examples), "--limit", "2",
                        "--device", "cpu", "--predictions", str(preds)])
    assert str(e.value).startswith(f"error: {preds}: appeared while this ran, and is kept"), e.value
    assert preds.read_text() == "another run's predictions\n" and "acc_norm" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_cli_damaged_gpt2_ranks_file_is_one_line(tmp_path, cli_checkpoint, monkeypatch):
    ranks = tmp_path / "cache" / "gpt2.tiktoken"
    ranks.parent.mkdir()
    ranks.write_bytes(gpt2_ranks_path().read_bytes()[:100_000])
    monkeypatch.setenv("GPT2_REPRO_CACHE", str(ranks.parent))
    gpt2_encoding.cache_clear()
    try:
        with pytest.raises(SystemExit) as e:
            hellaswag.main(cli_checkpoint)
    finally:
        gpt2_encoding.cache_clear()  # later tests rebuild the encoding from the real file
    msg = str(e.value)
    assert msg.startswith(f"error: {ranks}: ") and "python prepare.py" in msg and "\n" not in msg, msg
