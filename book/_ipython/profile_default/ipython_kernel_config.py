# Kernel settings for the book's build (the Makefile sets IPYTHONDIR to this folder's parent):
# figures as SVG so they stay vector in the website and the PDF.
c = get_config()  # noqa: F821
c.InlineBackend.figure_formats = {"svg"}
c.InlineBackend.rc = {"figure.dpi": 100, "savefig.bbox": "tight", "svg.fonttype": "path"}
# A cell tagged raises-exception shows the error's message, not a traceback.
c.InteractiveShell.xmode = "Minimal"
# transformers imports tqdm.auto, which warns on stderr without ipywidgets; stderr in a cell
# fails the build, and the book shows no progress bars anyway.
c.InteractiveShellApp.exec_lines = [
    "import warnings",
    "warnings.filterwarnings('ignore', message='IProgress not found')",
]
