"""The interactive demo in the browser (``demo.py``): ``sessions`` holds the model and each visitor's image and
prompts, ``server`` speaks HTTP and serves ``page.html``, a self-contained page (no external assets)."""
