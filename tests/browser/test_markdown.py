"""Answers rendered as Markdown in real Chromium, while they stream; model output that attacks the page does nothing.

The model is tests/browser/scripted_model.py's: it says, in small deltas, exactly the text a test gives it.
"""

from __future__ import annotations

from playwright.sync_api import Page, expect

from .conftest import save_screenshot
from .scripted_model import Scripted, deltas

ANSWER = "[data-testid=message][data-role=assistant]"
ANSWER_TEXT = f"{ANSWER} [data-testid=message-text]"

CODE = 'def greet(name):\n    return f"<b>Hello, {name}</b>"  # a line long enough to scroll sideways on a phone'
MARKDOWN = f"""# Streaming relays

Each word goes out **at once**, with *no* waiting; see [the docs](https://example.com/docs) or `RELAY_MODEL`.

- WebSocket first
- SSE where sockets fail
- EventSource for old clients

1. send
2. stream

| transport | resumes | notes |
|:----------|:-------:|------:|
| WebSocket | yes | one socket |
| SSE | yes | a POST each |

```python
{CODE}
```

> quoted, with a [relative link](/api/conversations) that stays text

- [x] done
- [ ] to do
"""

# Every way model text could try to run a script, load something, or leave the page.
XSS = """<script>window.pwned = 'script'; alert('script')</script>

<img src=x onerror="window.pwned = 'img'; alert('img')">

<svg onload="window.pwned = 'svg'; alert('svg')"><circle r="1"></circle></svg>

<iframe src="javascript:parent.pwned = 'iframe'; alert('iframe')"></iframe>

<iframe srcdoc="<script>parent.pwned = 'srcdoc'</script>"></iframe>

<details open ontoggle="window.pwned = 'details'">toggle</details>

<math><mtext><table><mglyph><style><img src=x onerror="window.pwned = 'mxss'"></style></mglyph></table></mtext></math>

<style>body { display: none }</style>

<form action="https://evil.invalid/"><button>submit</button></form>

Inline: <b onmouseover="window.pwned = 'b'">bold</b> and <a href="javascript:alert('a')">raw anchor</a>.

[click me](javascript:window.pwned='link')

[data link](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)

[vbscript link](vbscript:msgbox(1)) and [entity link](jav&#x61;script:alert(1))

![pixel](https://tracker.invalid/pixel.png) ![script image](javascript:alert(1))

[reference link][r]

[r]: javascript:alert('ref')

A safe one: <https://example.com/safe>
"""

WATCH = """
window.__sentinel = 'untouched';
window.__violations = [];
document.addEventListener('securitypolicyviolation',
  (e) => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));
// Frames and renders: each frame bumps __frame first; each DOM update of an answer's text is a render.
window.__frame = 0;
window.__renders = [];
const tick = () => { window.__frame++; requestAnimationFrame(tick) };
requestAnimationFrame(tick);
new MutationObserver((mutations) => {
  if (mutations.some((m) => m.target.closest?.('[data-role=assistant] [data-testid=message-text]')))
    window.__renders.push(window.__frame);
}).observe(document, { subtree: true, childList: true, characterData: true });
"""


def send(page: Page, text: str) -> None:
    page.fill("[data-testid=message-input]", text)
    page.keyboard.press("Enter")


def open_watched(page: Page, server) -> tuple[list[str], list[str]]:
    """The page, watched: the dialogs it opens and the requests it makes to anything but the relay."""
    dialogs: list[str] = []
    elsewhere: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on("request", lambda request: None if request.url.startswith(server.url) else elsewhere.append(request.url))
    page.add_init_script(WATCH)
    page.goto(server.url)
    return dialogs, elsewhere


def test_an_answer_renders_as_markdown_while_it_streams_and_a_code_block_copies(page, context, scripted_server,
                                                                                scripted_model):
    """Mutation: markdownView.set rendering at once instead of on the next animation frame fails the
    once-per-frame check (renders come in runs within one frame)."""
    scripted_model.scripts["Show me Markdown"] = Scripted(MARKDOWN)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=scripted_server.url)
    open_watched(page, scripted_server)
    send(page, "Show me Markdown")

    # The heading is a heading before the answer is done.
    state = page.wait_for_function(
        f"() => document.querySelector('{ANSWER_TEXT} h1') && document.querySelector('{ANSWER}').dataset.state")
    assert state.json_value() == "streaming"
    expect(page.locator(ANSWER)).to_have_attribute("data-state", "complete", timeout=20_000)

    text = page.locator(ANSWER_TEXT)
    expect(text.locator("h1")).to_have_text("Streaming relays")
    expect(text.locator("strong")).to_have_text("at once")
    expect(text.locator("em")).to_have_text("no")
    expect(text.locator("p > code")).to_have_text("RELAY_MODEL")
    link = text.locator("a", has_text="the docs")
    expect(link).to_have_attribute("href", "https://example.com/docs")
    expect(link).to_have_attribute("target", "_blank")
    expect(link).to_have_attribute("rel", "noopener noreferrer nofollow")
    expect(text.locator("ul").first.locator("li")).to_have_text(
        ["WebSocket first", "SSE where sockets fail", "EventSource for old clients"])
    expect(text.locator("ol li")).to_have_text(["send", "stream"])
    expect(text.locator("table th")).to_have_text(["transport", "resumes", "notes"])
    expect(text.locator("table tbody tr")).to_have_count(2)
    expect(text.locator("table tbody tr").nth(1).locator("td")).to_have_text(["SSE", "yes", "a POST each"])
    expect(text.locator("table td").nth(2)).to_have_attribute("align", "right")
    expect(text.locator("blockquote")).to_contain_text("relative link")
    assert text.locator("blockquote a").count() == 0, "a relative link in model output is not a link"
    expect(text.locator("ul").nth(1).locator("li")).to_have_text(["☑ done", "☐ to do"])
    assert text.locator("input").count() == 0
    expect(text.locator("pre code")).to_have_text(CODE)
    expect(text.locator("pre code")).to_have_class("language-python")

    # Rendered at most once per animation frame, many deltas to a frame (the last render may be the flush at
    # `done`, in the frame of the one before). Rendering on every chunk fails both.
    renders = page.evaluate("window.__renders")
    streamed = renders[:-1]
    assert len(streamed) == len(set(streamed)), f"two renders in one frame: {renders}"
    assert 1 < len(renders) < len(deltas(MARKDOWN)) / 2, (len(renders), len(deltas(MARKDOWN)))

    text.locator("[data-testid=copy-code]").click()
    expect(text.locator("[data-testid=copy-code]")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == CODE
    save_screenshot(page, "markdown-answer")

    # The same Markdown from the stored conversation, and on a phone nothing pushes the page sideways.
    page.reload()
    expect(page.locator(f"{ANSWER_TEXT} h1")).to_have_text("Streaming relays")
    expect(page.locator(f"{ANSWER_TEXT} pre code")).to_have_text(CODE)
    page.set_viewport_size({"width": 375, "height": 740})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    save_screenshot(page, "markdown-answer-phone")


def assert_nothing_ran(page: Page, dialogs: list[str], elsewhere: list[str]) -> None:
    answer = page.locator(ANSWER_TEXT)
    assert page.evaluate("[window.pwned, window.__sentinel]") == [None, "untouched"]
    assert dialogs == []
    assert page.evaluate("window.__violations") == [], "a CSP violation: something tried to load or run"
    assert elsewhere == [], "the page fetched something from elsewhere"
    dangerous = "script, img, svg, iframe, details, math, style, form, button, input, object, embed"
    assert answer.locator(dangerous).count() == 0
    assert page.evaluate("document.body.getBoundingClientRect().height") > 0
    links = answer.locator("a")
    assert [links.nth(i).get_attribute("href") for i in range(links.count())] == [
        "https://tracker.invalid/pixel.png", "https://example.com/safe"]
    assert answer.locator("[onerror], [onload], [onmouseover], [ontoggle], [style]").count() == 0
    # What was refused is still there to read, as text.
    shown = answer.text_content()
    for words in ("<script>window.pwned = 'script'", "<img src=x onerror=", '<a href="javascript:alert(\'a\')">',
                  "click me", "data link", "vbscript link", "reference link", "pixel"):
        assert words in shown, words


def test_model_output_that_attacks_the_page_never_runs(page, scripted_server, scripted_model):
    """Mutation: marked's html renderer passing raw HTML through (with or without DOMPurify after it) fails
    this with CSP violations from inline handlers and scripts."""
    scripted_model.scripts["Attack the page"] = Scripted(XSS)
    dialogs, elsewhere = open_watched(page, scripted_server)
    expect(page.locator("[data-testid=composer]")).to_be_visible()
    globals_before = set(page.evaluate("Object.getOwnPropertyNames(window)"))
    send(page, "Attack the page")
    expect(page.locator(ANSWER)).to_have_attribute("data-state", "complete", timeout=20_000)
    # Hover and click everything the answer shows: a handler that survived would fire now.
    answer = page.locator(ANSWER_TEXT)
    answer.hover()
    for word in ("bold", "click me", "data link", "vbscript link", "entity link", "reference link"):
        page.get_by_text(word, exact=False).first.click()
    assert_nothing_ran(page, dialogs, elsewhere)
    assert len(page.context.pages) == 1, "a click opened a window"
    assert set(page.evaluate("Object.getOwnPropertyNames(window)")) == globals_before, "something changed window"
    save_screenshot(page, "markdown-xss-corpus")

    # The stored answer takes the other path into the page (a whole text, not deltas): the same again.
    page.reload()
    expect(page.locator(ANSWER)).to_have_attribute("data-state", "complete")
    assert_nothing_ran(page, dialogs, elsewhere)
