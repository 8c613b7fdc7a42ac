"""`kadiff app`: a local web page (Gradio) over the same pipelines as the CLI and the Python API."""
