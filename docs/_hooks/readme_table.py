"""MkDocs hook: the optimizer table has one source, the README's block between
``<!-- optimizers:begin -->`` and ``<!-- optimizers:end -->``; a page that holds the line
``<!-- optimizers -->`` gets that block in its place, so the site and the README agree."""
import os

BEGIN, END, PLACE = "<!-- optimizers:begin -->", "<!-- optimizers:end -->", "<!-- optimizers -->"


def on_page_markdown(markdown, page, config, files, **kwargs):
    if PLACE not in markdown:
        return markdown
    readme = os.path.join(os.path.dirname(config["config_file_path"]), "README.md")
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise ValueError(f"README.md lacks the {BEGIN} ... {END} block the docs include")
    block = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n")
    return markdown.replace(PLACE, block)
