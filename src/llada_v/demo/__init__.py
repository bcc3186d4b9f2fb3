"""The embedded demo: a tiny LLaDA-V trained from scratch on a synthetic shapes task (docs/demo.md).

- `task`: the scenes, questions and answers of the shipped model's task;
- `scenes`: the richer scenes task (1-5 shapes with sizes, long descriptions; `--task scenes`);
- `tasks`: the tasks by name (`get_task`);
- `model`: the demo's word-level tokenizer, config and processor, and where the shipped checkpoint lives;
- `train`: the training run that produced the shipped checkpoint (`python -m llada_v.demo.train`);
- `app`: `llada-v demo` and `llada-v eval-demo`;
- `checkpoint/`: the shipped weights and configs (its remote-code modules link to the package's own).

Package-only code (never part of a checkpoint's remote code).
"""
