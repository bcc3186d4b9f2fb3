"""The llada-v web page as a Hugging Face Space (docs/web.md): chat about images beside the answer canvas,
redrawn at every denoising step.

Copy this folder (app.py, requirements.txt, README.md) into a Gradio Space. It serves the embedded demo model;
set the Space variable LLADA_V_MODEL to a converted checkpoint (folder or Hub id) to serve that instead, and
LLADA_V_FAST=1 to start with the fast-decoding preset. Locally: `python examples/space/app.py`
(GRADIO_SERVER_PORT picks the port).
"""

from llada_v.web.app import space_app

demo = space_app()

if __name__ == "__main__":
    demo.launch(ssr_mode=False)
