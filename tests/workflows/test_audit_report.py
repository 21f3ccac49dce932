"""Tests for the stability audit's report: figures, blocks, the self-contained HTML and the Markdown with files."""

from __future__ import annotations

import base64
import os
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from audit_fixture import null_audit, sample_audit

from stablenet.workflows.audit_document import AUDIT_FORMAT, audit_blocks
from stablenet.workflows.audit_figures import (
    certified_accuracy_figure,
    landscape_figure,
    lipschitz_figure,
    radius_scatter_figure,
    render_figures,
    thumbnails_figure,
)
from stablenet.workflows.audit_report import render_html, render_markdown, write_audit_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ["Summary", "Lipschitz", "Certificates", "Soundness", "Curvature", "Settings"]


def thumbnails(audit, channels=1):
    rng = np.random.default_rng(1)
    return {d["index"]: rng.random((channels, 8, 8)) for d in audit["certificates"]["disagreements"]}


def png_size(png):
    """(width, height) from the IHDR chunk."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


class Page(HTMLParser):
    """Every start tag with its attributes, every text run, and the text under each heading level."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.texts, self.headings, self._heading = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("h1", "h2", "h3"):
            self._heading = ""

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append((tag, self._heading))
            self._heading = None

    def handle_data(self, data):
        self.texts.append(data)
        if self._heading is not None:
            self._heading += data


def parse(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    parser.close()
    return parser


@pytest.fixture(scope="module")
def full():
    audit = sample_audit()
    return audit, render_figures(audit, thumbnails(audit))


# ----------------------------------------------------------------------------------------------------- figures


@pytest.mark.parametrize(
    "make",
    [lipschitz_figure, certified_accuracy_figure, radius_scatter_figure, landscape_figure],
)
def test_figure_is_a_readable_png(make):
    png = make(sample_audit())
    assert png.startswith(PNG_MAGIC)
    width, height = png_size(png)
    assert 300 <= width <= 1100 and 200 <= height <= 900


@pytest.mark.parametrize("channels", [1, 3])
def test_thumbnails_figure_takes_gray_and_rgb(channels):
    audit = sample_audit()
    png = thumbnails_figure(audit, thumbnails(audit, channels))
    assert png.startswith(PNG_MAGIC) and png_size(png)[0] <= 1100


def test_thumbnails_figure_rejects_other_channel_counts():
    audit = sample_audit()
    images = {d["index"]: np.zeros((2, 8, 8)) for d in audit["certificates"]["disagreements"]}
    with pytest.raises(ValueError, match=r"shape \(C, H, W\) with C 1 or 3; got shape \(2, 8, 8\)"):
        thumbnails_figure(audit, images)


def test_figures_are_none_without_their_data():
    audit = null_audit()
    assert lipschitz_figure(audit) is None  # no per-layer bounds
    assert certified_accuracy_figure(audit) is None  # no certificate, no attack
    assert radius_scatter_figure(audit) is None
    assert thumbnails_figure(audit, {}) is None
    assert landscape_figure(audit) is None
    assert render_figures(audit) == {}
    full = sample_audit()
    assert thumbnails_figure(full, None) is None
    smoothing_only = sample_audit()
    del smoothing_only["certificates"]["methods"]["lipschitz"]
    assert radius_scatter_figure(smoothing_only) is None
    lipschitz_only = sample_audit()
    methods = lipschitz_only["certificates"]["methods"]
    lipschitz_only["certificates"]["methods"] = {"lipschitz": methods["lipschitz"]}
    assert radius_scatter_figure(lipschitz_only) is None
    assert certified_accuracy_figure(lipschitz_only).startswith(PNG_MAGIC)


def test_render_figures_names(full):
    assert sorted(full[1]) == ["certified_accuracy", "landscape", "lipschitz", "radius_scatter", "thumbnails"]


# -------------------------------------------------------------------------------------------------------- HTML


def test_html_is_valid_and_self_contained(full):
    audit, figures = full
    page = render_html(audit, figures)
    assert page.startswith("<!DOCTYPE html>")
    parsed = parse(page)
    tags = dict(parsed.tags)
    assert tags["html"].get("lang") == "en"
    assert any(t == "meta" and a.get("charset") == "utf-8" for t, a in parsed.tags)
    assert any(t == "meta" and a.get("name") == "viewport" for t, a in parsed.tags)
    assert not [t for t, a in parsed.tags if t in ("script", "link", "iframe", "object", "embed", "base")]
    for tag, attrs in parsed.tags:
        for value in attrs.values():
            assert "http://" not in (value or "") and "https://" not in (value or "")
            if tag != "img":
                assert not (value or "").startswith(("data:", "//"))
    text = "".join(parsed.texts)
    assert "http://" not in text and "https://" not in text and "url(" not in text and "@import" not in text
    assert 'src="//' not in page


def test_html_images_are_png_data_uris(full):
    audit, figures = full
    images = [attrs for tag, attrs in parse(render_html(audit, figures)).tags if tag == "img"]
    assert len(images) == len(figures) == 5
    for attrs in images:
        assert attrs["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(attrs["src"].split(",", 1)[1], validate=True).startswith(PNG_MAGIC)
        assert attrs["alt"]


def test_html_has_every_section_in_order(full):
    headings = [text for tag, text in parse(render_html(*full)).headings if tag == "h2"]
    positions = [next(i for i, h in enumerate(headings) if h.startswith(s)) for s in SECTIONS]
    assert positions == sorted(positions)
    assert headings[0] == "Summary"


def test_summary_numbers_equal_the_audit(full):
    audit, figures = full
    s = audit["summary"]
    parsed = parse(render_html(audit, figures))
    text = "".join(parsed.texts)
    summary = text[text.index("Summary") : text.index("Upper bound on the network")]
    best = audit["certificates"]["methods"][s["best_method"]]["label"]
    for expected in [
        f"{100 * s['clean_accuracy']:.1f}%",
        f"{100 * s['best_certified_accuracy']:.1f}%",
        f"by {best}",
        f"{100 * s['gap']:.1f} pts",
        f"{100 * s['empirical_robust_accuracy']:.1f}%",
        f"{s['tightness']:.3g}",
        f"lower {s['lipschitz_lower']:.4g} / upper {s['lipschitz_upper']:.4g}",
        s["warnings"][0],
    ]:
        assert expected in summary
    # The four numbers are the cards' big values, in order.
    cards = re.findall(r'<div class="value">([^<]*)</div>', render_html(audit, figures))
    assert cards == [
        f"{100 * s['clean_accuracy']:.1f}%",
        f"{100 * s['best_certified_accuracy']:.1f}%",
        f"{100 * s['gap']:.1f} pts",
        f"{s['tightness']:.3g}",
    ]


def test_tables_carry_the_audit_numbers(full):
    audit, figures = full
    text = "".join(parse(render_html(audit, figures)).texts)
    for m in audit["certificates"]["methods"].values():
        assert f"{m['acr']:.3g}" in text
        for a in m["certified_accuracy"]:
            assert f"{100 * a:.1f}%" in text
    for layer in audit["lipschitz"]["layers"]:
        assert layer["name"] in text and f"{layer['bound']:.4g}" in text
    page = render_html(audit, figures)
    for key, v in audit["soundness"]["verify"].items():
        label = audit["certificates"]["methods"][key]["label"]
        counts = "".join(f'<td class="num">{v[n]}</td>' for n in ("n_certified", "n_attacked", "n_broken"))
        assert f"<tr><td>{label}</td>{counts}" in page
    assert "head.dropout" in text and "random in training mode" in text
    assert f"{audit['curvature']['trace']['estimate']:.4g} ± " in text
    for name in audit["stages"]:
        assert name in text
    for value in audit["environment"].values():
        assert value in text
    assert "smoothing.n0" in text and "attack.restarts" in text


def test_no_warnings_says_so():
    audit = sample_audit()
    audit["summary"]["warnings"] = []
    page = render_html(audit, {})
    assert "No warnings." in page and 'class="warnings"' not in page
    assert "No warnings." in render_markdown(audit, {})


def test_strings_from_the_audit_are_escaped():
    audit = sample_audit()
    audit["summary"]["warnings"] = ["<b>x</b> & <script>alert(1)</script>"]
    audit["subject"]["model"] = 'net"<i>'
    audit["lipschitz"]["unbounded"][0]["name"] = "<img src=x>"
    page = render_html(audit, {})
    assert "&lt;b&gt;x&lt;/b&gt; &amp; &lt;script&gt;" in page
    assert "<b>x</b>" not in page and "<script" not in page and "<img src=x>" not in page and "<i>" not in page
    markdown = render_markdown(audit, {})
    assert r"\<b\>x\</b\>" in markdown and r"\<img src=x\>" in markdown
    assert not re.search(r"(?<!\\)[<>]", markdown)


def test_missing_figures_say_why_instead():
    page = render_html(sample_audit(), {})
    assert "<img" not in page
    assert "no images given" in page


def test_null_variant_renders():
    audit = null_audit()
    page = render_html(audit, render_figures(audit))
    text = "".join(parse(page).texts)
    for section in SECTIONS:
        assert section in text
    assert "(some modules cannot be bounded)" in text
    assert "pool" in text and "MaxPool2d" in text
    assert "No certificate was computed." in text and "No attack was run." in text
    assert "Curvature was not computed: the loss is not twice differentiable" in text
    assert "no upper bound: 2 module(s) cannot be bounded" in text
    assert "<img" not in page
    markdown = render_markdown(audit, {})
    assert "](" not in markdown
    assert "| commit | – |" in markdown


def test_factory_subject_and_standard_radii():
    audit = sample_audit()
    audit["subject"].update(kind="factory", run=None, factory="torchvision.models:resnet18")
    audit["settings"]["radii"] = [36 / 255, 72 / 255, 108 / 255, 1.0]
    audit["summary"]["headline_radius"] = 36 / 255
    page = render_html(audit, {})
    assert "model factory torchvision.models:resnet18" in page
    assert "ε = 36/255" in page and "ε = 72/255" in page


@pytest.mark.parametrize("bad", [{}, {"format": "stablenet-audit/2"}, [1, 2]])
def test_rejects_what_is_not_an_audit(bad, tmp_path):
    with pytest.raises(ValueError, match=f"audit must be a dict with format '{AUDIT_FORMAT}'; got"):
        audit_blocks(bad)
    with pytest.raises(ValueError, match="audit must be a dict"):
        write_audit_report(bad, tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- Markdown


def test_markdown_has_the_same_sections_and_numbers(full):
    audit, _ = full
    markdown = render_markdown(audit, {"lipschitz": "figures/lipschitz.png"})
    headings = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert [h for s in SECTIONS for h in headings if h[3:].startswith(s)] == headings
    s = audit["summary"]
    assert f"**Clean accuracy: {100 * s['clean_accuracy']:.1f}%**" in markdown
    assert "![Lipschitz bound per layer](figures/lipschitz.png)" in markdown
    assert markdown.count("![") == 1


def test_write_audit_report_writes_files_atomically(tmp_path):
    audit = sample_audit()
    markdown, page = write_audit_report(audit, tmp_path / "out", thumbnails(audit))
    assert (markdown, page) == (tmp_path / "out" / "audit.md", tmp_path / "out" / "audit.html")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown.read_text(encoding="utf-8"))
    assert sorted(links) == sorted(f"figures/{n}.png" for n in render_figures(audit, thumbnails(audit)))
    for link in links:
        assert (markdown.parent / link).read_bytes().startswith(PNG_MAGIC)
    html_text = page.read_text(encoding="utf-8")
    assert html_text == render_html(audit, render_figures(audit, thumbnails(audit)))
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []
    # Rewriting replaces the files in place.
    write_audit_report(audit, tmp_path / "out", thumbnails(audit))
    assert sorted(os.listdir(tmp_path / "out")) == ["audit.html", "audit.md", "figures"]


def test_write_audit_report_null_variant(tmp_path):
    markdown, page = write_audit_report(null_audit(), tmp_path)
    assert markdown.exists() and page.exists()
    assert not (tmp_path / "figures").exists()
