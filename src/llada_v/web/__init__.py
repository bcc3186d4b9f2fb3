"""The web app: `llada-v web` (a Gradio Blocks page: image chat beside the denoising, live) and the same page
mounted by `llada-v serve --web` (docs/web.md).

- `command.py`: the `llada-v web` arguments (standard library only, the hook `cli.py` calls);
- `app.py`: the page (`build_blocks`), its engines (`LocalEngine`: the model in this process; the serving
  replica, `serving.http_app`), the canvas drawing, `run_web` behind `llada-v web`;
- `examples/space/app.py` (outside the package) is the file a Hugging Face Space runs (`app.space_app`).

Only `app.py` imports Gradio, when the command runs.
"""
