# Kernel settings for the book's build (the Makefile sets IPYTHONDIR to this folder's parent):
# figures as SVG so they stay vector in the website and the PDF.
c = get_config()  # noqa: F821
c.InlineBackend.figure_formats = {"svg"}
c.InlineBackend.rc = {"figure.dpi": 100, "savefig.bbox": "tight", "svg.fonttype": "path"}
