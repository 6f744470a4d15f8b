"""The library the stage scripts stand on. Imports run downwards only: a module here never imports a stage script.

| module | what it owns |
|---|---|
| `config` | `TrainConfig` (defaults = GPT-2 124M; model flags = model configs' fields), presets, command line, ranges |
| `models` | the model types by name (`gpt`, `bigram`, `lecture`), each with its config class |
| `build` | a run's parts from its config: tokenizer and loaders, model, optimizer, the compiled, DDP or FSDP module |
| `resume` | which checkpoint to resume, `--out_dir` rules, data and model restored (or built), training state |
| `stopping` | SIGINT/SIGTERM: a checkpoint at the next step boundary, then exit |
| `eval_mode` | `with eval_mode(model):` evaluation mode for a block, the previous mode restored |
| `checkpoint` | the checkpoint format; models from checkpoints, HF dirs (`load_pretrained`) or names (`load_model`) |
| `data` | token loaders (sharded or in memory; striped over ranks; exact resume) |
| `shards` | the token-shard format (name, dtype, header, open, id check) |
| `tokenizer` | GPT-2 BPE (tiktoken, offline) and the character vocabulary, one interface |
| `addition` | EX2's data: a+b=c problems, a held-out set, exact-match scoring |
| `loss` | the output layer and cross-entropy over chunks of rows (no full logits held) |
| `muon` | the Muon optimizer and the AdamW+Muon pair |
| `generate` | sampling and batched decoding against a static KV cache (CUDA graphs, half-precision weights) |
| `rundir` | a run directory: its lock, `config.json`, `metrics.jsonl` |
| `autobatch` | the micro-batch policy: accumulation steps, presets under torchrun, `--batch_size auto` |
| `devices` | device, precision, autocast; torchrun/DDP set-up, reductions; peak FLOPs; compile and its cache; `--fp8` |
| `cpu_caps` | native-bf16 detection and the measured CPU matmul peak per precision |
| `errors` | one-line errors at the command-line boundary; output-path checks |
| `fileio` | atomic writes with the umask's permissions, hashing, what a safe load refused |
| `gpt2_sizes` | OpenAI's GPT-2 names, shapes and sizes |
| `sharding` | FSDP wrapping and clipping over shards; sharded checkpoints (DCP), atomic, read through an allow-list |
"""
