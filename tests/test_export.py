"""export_hf.py: what `transformers` loads from the export computes what our checkpoint computes."""

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from conftest import shakespeare

import export_hf
from gpt2repro.checkpoint import load_model, model_checkpoint_fields, save_checkpoint
from gpt2repro.tokenizer import get_tokenizer
from model import GPT, BigramLanguageModel, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Hello, I'm a language model,"
PROMPT_IDS = [15496, 11, 314, 1101, 257, 3303, 2746, 11]  # OpenAI GPT-2's encoding of PROMPT


def random_gpt(vocab_size: int, bias: bool = True, seed: int = 0, **options) -> GPT:
    """A tiny GPT whose every parameter is random, so a transposed, swapped or dropped tensor changes the logits."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=16, bias=bias,
                          **options))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def write_ckpt(path, model, tokenizer):
    save_checkpoint({**model_checkpoint_fields(model, tokenizer), "step": 7}, path)
    return path


@torch.no_grad()
def hf_logits_match(model: GPT, out_dir, vocab_size: int) -> float:
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(out_dir).eval()
    assert hf.config.vocab_size == vocab_size and hf.lm_head.weight.shape[0] == vocab_size
    idx = torch.randint(0, vocab_size, (3, 32), generator=torch.Generator().manual_seed(1))
    ours, _ = model(idx)
    return (ours[..., :vocab_size] - hf(idx).logits).abs().max().item()


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory):
    """A GPT-2-tokenizer checkpoint with the vocab padded to 50304, exported through the CLI."""
    d = tmp_path_factory.mktemp("export")
    model = random_gpt(50304)
    ckpt = write_ckpt(d / "run" / "ckpt_0000007.pt", model, get_tokenizer("gpt2"))
    export_hf.main([str(ckpt), str(d / "hf")])
    return model, d / "hf", d


def test_logits_match_transformers(gpt2_export):
    model, out, _ = gpt2_export
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert hf_logits_match(model, out, 50257) <= 1e-4


def test_tokenizer_matches_tiktoken(gpt2_export):
    from transformers import AutoTokenizer

    _, out, _ = gpt2_export
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(PROMPT)["input_ids"] == PROMPT_IDS
    assert tok.encode("<|endoftext|>") == [50256] and tok.eos_token_id == 50256
    # the tiktoken encoding our training used is the reference for everything else
    ref = get_tokenizer("gpt2")
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  Ünïcödé 日本語 🙂 it's 3.14159  \t end"
    assert tok(text)["input_ids"] == ref.encode(text)
    assert tok.decode(ref.encode(text)) == text
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 50000 and merges[1] == "Ġ t"
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8"))["Hello"] == 15496


def test_pipeline_generates_our_greedy_tokens(gpt2_export):
    from transformers import pipeline

    model, out, _ = gpt2_export
    gen = pipeline("text-generation", model=str(out), device="cpu")
    got = gen(PROMPT, max_new_tokens=8, do_sample=False, return_tensors=True)
    ours = model.generate(torch.tensor([PROMPT_IDS]), 8, temperature=0, vocab_size=50257)[0, len(PROMPT_IDS) :]
    assert list(got[0]["generated_token_ids"]) == PROMPT_IDS + ours.tolist()


def test_char_checkpoint_exports_model_and_says_tokenizer_is_ours(tmp_path, capsys):
    text = shakespeare().read_text(encoding="utf-8")[:5000]
    tok = get_tokenizer("char", text=text)
    model = random_gpt(tok.vocab_size, seed=3)
    ckpt = write_ckpt(tmp_path / "ckpt_0000001.pt", model, tok)
    export_hf.main([str(ckpt), str(tmp_path / "hf")])
    assert "not a Hugging Face" in capsys.readouterr().out
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "hf" / export_hf.OUR_TOKENIZER_FILE).read_text(encoding="utf-8")) == tok.to_dict()
    assert hf_logits_match(model, tmp_path / "hf", tok.vocab_size) <= 1e-4


def test_biasless_model_exports_with_zero_biases(tmp_path):
    tok = get_tokenizer("char", text="abcdefghij ")
    model = random_gpt(16, bias=False, seed=4)
    export_hf.export(write_ckpt(tmp_path / "c.pt", model, tok), tmp_path / "hf", verify=False)
    assert hf_logits_match(model, tmp_path / "hf", tok.vocab_size) <= 1e-4


def test_reexport_replaces_previous_export_only_with_overwrite(tmp_path):
    tok = get_tokenizer("char", text="abcdefghij ")
    a, b = random_gpt(11, seed=5), random_gpt(11, seed=6)
    export_hf.export(write_ckpt(tmp_path / "a.pt", a, tok), tmp_path / "hf")
    export_hf.export(tmp_path / "a.pt", tmp_path / "hf", verify=False)  # the same checkpoint again: no flag needed
    before = tree_digest(tmp_path / "hf")
    with pytest.raises(SystemExit) as e:  # another checkpoint's export is a result of its own
        export_hf.main([str(write_ckpt(tmp_path / "b.pt", b, tok)), str(tmp_path / "hf")])
    assert str(e.value.code) == (f"error: {tmp_path / 'hf'}: holds the export of another checkpoint "
                                 f"({(tmp_path / 'a.pt').resolve()}); pass --overwrite to replace it, or choose a new "
                                 "output directory")
    assert tree_digest(tmp_path / "hf") == before
    export_hf.main([str(tmp_path / "b.pt"), str(tmp_path / "hf"), "--overwrite"])
    assert hf_logits_match(b, tmp_path / "hf", 11) <= 1e-4
    marker = json.loads((tmp_path / "hf" / export_hf.EXPORT_MARKER).read_text(encoding="utf-8"))
    assert marker["checkpoint"] == str((tmp_path / "b.pt").resolve())
    assert marker["sha256"] == hashlib.sha256((tmp_path / "b.pt").read_bytes()).hexdigest()
    written = sorted(p.name for p in (tmp_path / "hf").iterdir() if p.name != export_hf.EXPORT_MARKER)
    assert sorted(marker["files"]) == written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def tree_digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_export_never_replaces_what_it_did_not_write(tmp_path):
    """An earlier export holding a file of the user's, a HF dir from elsewhere, an empty dir (allowed)."""
    tok = get_tokenizer("char", text="abcdefghij ")
    ckpt = write_ckpt(tmp_path / "a.pt", random_gpt(11, seed=5), tok)
    export_hf.export(ckpt, tmp_path / "hf")
    (tmp_path / "hf" / "README.md").write_text("my notes", encoding="utf-8")
    before = tree_digest(tmp_path)
    with pytest.raises(ValueError, match="README.md"):
        export_hf.export(ckpt, tmp_path / "hf")
    (tmp_path / "hf" / export_hf.EXPORT_MARKER).unlink()
    (tmp_path / "hf" / "README.md").unlink()
    with pytest.raises(ValueError, match=export_hf.EXPORT_MARKER):  # no marker: not ours, whatever it holds
        export_hf.export(ckpt, tmp_path / "hf")
    assert {k: v for k, v in tree_digest(tmp_path).items() if k in before} == {
        k: v for k, v in before.items() if not k.endswith(("README.md", export_hf.EXPORT_MARKER))}
    (tmp_path / "empty").mkdir()
    export_hf.export(ckpt, tmp_path / "empty", verify=False)
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_cli_refuses_to_export_into_a_run_dir_and_leaves_it_byte_identical(tmp_path):
    """`python export_hf.py R R` and `python export_hf.py other.pt R`: exit 1, one line, R untouched."""
    tok = get_tokenizer("char", text="abcdefghij ")
    run = tmp_path / "run"
    write_ckpt(run / "ckpt_0000007.pt", random_gpt(11, seed=5), tok)
    (run / "config.json").write_text('{"preset": "shakespeare-char", "max_steps": 7}\n', encoding="utf-8")
    (run / "metrics.jsonl").write_text('{"step": 7, "train_loss": 2.0}\n', encoding="utf-8")
    other = write_ckpt(tmp_path / "other.pt", random_gpt(11, seed=6), tok)
    before = tree_digest(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for src in (run, other, run / "ckpt_0000007.pt"):
        r = subprocess.run([sys.executable, str(ROOT / "export_hf.py"), str(src), str(run)], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {run}: "), r.stderr
        assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_follows_the_umask(tmp_path, umask):
    tok = get_tokenizer("char", text="abcdefghij ")
    ckpt = write_ckpt(tmp_path / "a.pt", random_gpt(11, seed=5), tok)
    old = os.umask(umask)
    try:
        export_hf.export(ckpt, tmp_path / "hf", verify=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o777 & ~umask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.parametrize("case", ["not_a_checkpoint", "bigram", "occupied_out_dir", "empty_run_dir"])
def test_bad_input_is_a_one_line_error(tmp_path, case, capsys):
    tok = get_tokenizer("char", text="abc")
    src, out = tmp_path / "ckpt.pt", tmp_path / "hf"
    if case == "not_a_checkpoint":
        src.write_text("hello", encoding="utf-8")
    elif case == "bigram":
        write_ckpt(src, BigramLanguageModel(GPTConfig(vocab_size=3)), tok)
    elif case == "occupied_out_dir":
        write_ckpt(src, random_gpt(3), tok)
        out.mkdir()
        (out / "notes.txt").write_text("mine", encoding="utf-8")
    else:
        src = tmp_path / "run"
        src.mkdir()
    with pytest.raises(SystemExit) as e:
        export_hf.main([str(src), str(out)])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg
    assert str(out if case == "occupied_out_dir" else src) in msg
    if case == "occupied_out_dir":
        assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    else:
        assert not out.exists()


@pytest.mark.parametrize("option, flag", [({"pos": "rope"}, "--pos rope"), ({"norm": "rmsnorm"}, "--norm rmsnorm"),
                                          ({"qk_norm": True}, "--qk_norm True"),
                                          ({"logit_softcap": 15.0}, "--logit_softcap 15.0")])
def test_options_gpt2_cannot_hold_are_refused_by_name(tmp_path, option, flag):
    tokenizer = get_tokenizer("char", text="abcdefgh")
    model = GPT(GPTConfig(block_size=8, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=8, **option))
    save_checkpoint({**model_checkpoint_fields(model, tokenizer), "step": 1}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=flag):
        export_hf.export(tmp_path / "c.pt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_relu2_and_untied_head_export_with_matching_logits(tmp_path):
    tokenizer = get_tokenizer("char", text="abcdefgh")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=16,
                          mlp="relu2", tie_embeddings=False, bias=False))
    save_checkpoint({**model_checkpoint_fields(model, tokenizer), "step": 1}, tmp_path / "c.pt")
    summary = export_hf.export(tmp_path / "c.pt", tmp_path / "hf")  # verifies the logits itself
    assert summary["max_logit_diff"] is not None and summary["max_logit_diff"] < 1e-4


@pytest.mark.parametrize("options", [{"mlp": "relu2"}, {"tie_embeddings": False}, {"mlp": "relu2", "bias": False}])
def test_export_loads_back_as_the_same_model(tmp_path, options):
    """load_model on an export rebuilds the options (relu2, an untied head) and computes the same logits."""
    tok = get_tokenizer("char", text="abcdefghij ")
    model = random_gpt(tok.vocab_size, seed=7, **options)
    export_hf.export(write_ckpt(tmp_path / "c.pt", model, tok), tmp_path / "hf", verify=False)
    loaded, _ = load_model(str(tmp_path / "hf"))
    assert (loaded.config.mlp, loaded.config.tie_embeddings) == (model.config.mlp, model.config.tie_embeddings)
    idx = torch.randint(0, tok.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (loaded.eval()(idx)[0] - model(idx)[0]).abs().max().item() <= 1e-5


def test_export_writes_utf8_under_a_non_utf8_locale(tmp_path):
    """Under LANG=C without UTF-8 mode Python's default text encoding is ASCII: every file is written as UTF-8."""
    tok = get_tokenizer("char", text="abc é日\n")
    ckpt = write_ckpt(tmp_path / "c.pt", random_gpt(tok.vocab_size, seed=8), tok)
    script = ("import sys; from pathlib import Path; import export_hf; "
              "export_hf.main([sys.argv[1], sys.argv[2], '--no_verify']); "
              "Path(sys.argv[3]).mkdir(); export_hf.save_gpt2_tokenizer(Path(sys.argv[3]), 32)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", script, str(ckpt), str(tmp_path / "hf"), str(tmp_path / "tok")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "hf" / export_hf.OUR_TOKENIZER_FILE).read_text(encoding="utf-8")) == tok.to_dict()
    assert json.loads((tmp_path / "tok" / "vocab.json").read_text(encoding="utf-8"))["Ġthe"] == 262
    assert (tmp_path / "tok" / "merges.txt").read_text(encoding="utf-8").splitlines()[1] == "Ġ t"
