"""`lotus app`: a local web app (Gradio) over the shared predictor, and the folder browser behind it.

``service`` predicts one upload at a time through the same library path as `lotus depth` (``run.predict``),
``browse`` reads a finished output folder (read-only, never outside it), ``security`` checks uploads and
the address the app binds to, and ``ui`` builds the page. Gradio is imported only by ``ui``, and only when
the app is built: `import lotus_cli` and `lotus --help` never load it.
"""
