"""The llada-v web page as a Hugging Face Space (docs/web.md): chat about images beside the answer canvas,
redrawn at every denoising step.

Copy this folder (app.py, requirements.txt, README.md) into a Gradio Space. It serves the embedded demo model;
the Space variable LLADA_V_WEB_ARGS takes `llada-v web` flags to serve another checkpoint, e.g.
"--model you/llada-v-hf --dtype bfloat16 --fast". Locally: `python examples/space/app.py` (GRADIO_SERVER_PORT
picks the port).
"""

from llada_v.web.app import space_app

demo = space_app()

if __name__ == "__main__":
    demo.launch(ssr_mode=False)
