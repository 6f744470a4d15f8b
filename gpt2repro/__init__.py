"""The library the stage scripts stand on. Imports run downwards only: a module here never imports a stage script.

| module | what it owns |
|---|---|
| `config` | `TrainConfig` (defaults = GPT-2 124M), presets, the command line, every flag's allowed range |
| `checkpoint` | the checkpoint format; models from checkpoints, HF dirs or names (`load_model`); resume policy |
| `data` | token loaders (sharded or in memory; striped over ranks; exact resume) |
| `shards` | the token-shard format (name, dtype, header, open, id check) |
| `tokenizer` | GPT-2 BPE (tiktoken, offline) and the character vocabulary, one interface |
| `addition` | EX2's data: a+b=c problems, a held-out set, exact-match scoring |
| `loss` | the output layer and cross-entropy over chunks of rows (no full logits held) |
| `muon` | the Muon optimizer and the AdamW+Muon pair |
| `generate` | sampling and batched decoding against a static KV cache (CUDA graphs, half-precision weights) |
| `rundir` | a run directory: its lock, `config.json`, `metrics.jsonl` |
| `autobatch` | `--batch_size auto`: the largest micro-batch that fits a real step |
| `devices` | device, precision, autocast; torchrun/DDP set-up, reductions; peak FLOPs; compile and its cache; `--fp8` |
| `cpu_caps` | native-bf16 detection and the measured CPU matmul peak per precision |
| `errors` | one-line errors at the command-line boundary; output-path checks |
| `fileio` | atomic writes with the umask's permissions, hashing, what a safe load refused |
| `gpt2_sizes` | OpenAI's GPT-2 names, shapes and sizes |
| `sharding` | FSDP wrapping and clipping over shards; sharded checkpoints (DCP), atomic, read through an allow-list |
"""
