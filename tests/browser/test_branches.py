"""Conversations as trees on the demo page in real Chromium: regenerate, "‹ 1/2 ›" between siblings, edit,
continue, copy; and the conversation list's rename, delete (after a confirmation), older pages and title search.

The model is tests/browser/scripted_model.py's: "Answer N to: PROMPT" unless a test scripts the prompt, so two
answers to one message differ, and the requests it got show the history the relay sent.
"""

from __future__ import annotations

import re

import httpx
from playwright.sync_api import Page, expect

from ..conftest import RelayServer, assert_no_traceback
from .conftest import save_screenshot
from .scripted_model import CONTINUATION, Scripted, text_of

MESSAGE = "[data-testid=message]"
ANSWER = f"{MESSAGE}[data-role=assistant]"
USER = f"{MESSAGE}[data-role=user]"


def send(page: Page, text: str) -> None:
    page.fill("[data-testid=message-input]", text)
    page.keyboard.press("Enter")


def answered(page: Page, count: int) -> None:
    """`count` answers on screen, the last one finished and given its controls (the tree reloaded)."""
    expect(page.locator(ANSWER)).to_have_count(count)
    expect(page.locator(ANSWER).last).to_have_attribute("data-state", "complete", timeout=20_000)
    expect(page.locator(ANSWER).last.locator("[data-testid=regenerate]")).to_be_visible()


def conversation_in_url(page: Page) -> str:
    page.wait_for_function("() => location.hash.startsWith('#c=')")
    return page.evaluate("location.hash.slice(3)")


def shown_texts(page: Page) -> list[str]:
    return page.locator(f"{MESSAGE} [data-testid=message-text]").all_text_contents()


def answer_to(prompt: str) -> re.Pattern[str]:
    return re.compile(rf"^Answer \d+ to: {re.escape(prompt)}$")


def active_path(server, conversation_id: str) -> list[str]:
    body = httpx.get(f"{server.url}/api/conversations/{conversation_id}/messages?path=active").json()
    return [m["content"] for m in body["messages"]]


def test_regenerate_makes_a_second_answer_and_the_arrows_move_between_them(page, scripted_server, scripted_model):
    page.goto(scripted_server.url)
    send(page, "Tell me a story")
    answered(page, 1)
    first = page.locator(f"{ANSWER} [data-testid=message-text]").text_content()
    assert answer_to("Tell me a story").match(first)
    expect(page.locator(f"{ANSWER} [data-testid=sibling-position]")).to_have_count(0)  # one answer: no arrows

    page.locator(ANSWER).locator("[data-testid=regenerate]").click()
    answered(page, 1)
    second = page.locator(f"{ANSWER} [data-testid=message-text]").text_content()
    assert answer_to("Tell me a story").match(second) and second != first
    position = page.locator(f"{ANSWER} [data-testid=sibling-position]")
    expect(position).to_have_text("2/2")
    expect(page.locator(f"{ANSWER} [data-testid=sibling-next]")).to_be_disabled()
    # The regenerated answer had the same history: the user's message, and nothing of the first answer.
    assert [text_of(m) for m in scripted_model.requests[-1]["messages"]] == ["Tell me a story"]
    save_screenshot(page, "branches-regenerated")

    conversation_id = conversation_in_url(page)
    page.locator(f"{ANSWER} [data-testid=sibling-previous]").click()
    expect(position).to_have_text("1/2")
    expect(page.locator(f"{ANSWER} [data-testid=message-text]")).to_have_text(first)
    assert active_path(scripted_server, conversation_id) == ["Tell me a story", first]
    page.locator(f"{ANSWER} [data-testid=sibling-next]").click()
    expect(position).to_have_text("2/2")
    expect(page.locator(f"{ANSWER} [data-testid=message-text]")).to_have_text(second)

    # The branch chosen is the server's: a reload shows it.
    page.locator(f"{ANSWER} [data-testid=sibling-previous]").click()
    expect(position).to_have_text("1/2")
    page.reload()
    expect(page.locator(f"{ANSWER} [data-testid=sibling-position]")).to_have_text("1/2")
    assert shown_texts(page) == ["Tell me a story", first]


def test_an_edit_is_a_new_branch_with_its_own_answer_and_the_old_one_stays(page, scripted_server, scripted_model):
    page.goto(scripted_server.url)
    send(page, "First question")
    answered(page, 1)
    send(page, "Second question")
    answered(page, 2)
    before_edit = shown_texts(page)

    second = page.locator(USER).nth(1)
    second.locator("[data-testid=edit-message]").click()
    field = second.locator("[data-testid=edit-input]")
    expect(field).to_have_value("Second question")
    field.fill("Second question, put better")
    second.locator("[data-testid=edit-send]").click()
    answered(page, 2)
    texts = shown_texts(page)
    assert texts[:3] == [*before_edit[:2], "Second question, put better"]
    assert answer_to("Second question, put better").match(texts[3])
    # The model saw the path to the edited message: the first exchange, then the edit; not the old question.
    sent = [text_of(m) for m in scripted_model.requests[-1]["messages"]]
    assert sent == [*before_edit[:2], "Second question, put better"]
    expect(page.locator(USER).nth(1).locator("[data-testid=sibling-position]")).to_have_text("2/2")
    save_screenshot(page, "branches-edited")

    # Back to the message before the edit: its own answer comes back with it.
    page.locator(USER).nth(1).locator("[data-testid=sibling-previous]").click()
    expect(page.locator(USER).nth(1).locator("[data-testid=sibling-position]")).to_have_text("1/2")
    assert shown_texts(page) == before_edit

    # An edit of the first message makes a second root; Escape leaves the editor without sending.
    first = page.locator(USER).first
    first.locator("[data-testid=edit-message]").click()
    first.locator("[data-testid=edit-input]").press("Escape")
    expect(first.locator("[data-testid=edit-input]")).to_have_count(0)
    assert shown_texts(page) == before_edit
    first.locator("[data-testid=edit-message]").click()
    first.locator("[data-testid=edit-input]").fill("A new start")
    first.locator("[data-testid=edit-input]").press("Enter")
    answered(page, 1)
    expect(page.locator(USER).first.locator("[data-testid=sibling-position]")).to_have_text("2/2")
    assert [text_of(m) for m in scripted_model.requests[-1]["messages"]] == ["A new start"]


def test_an_answer_cut_off_at_max_tokens_continues_in_place(page, context, scripted_server, scripted_model):
    scripted_model.scripts["Write at length"] = Scripted("The answer starts here", stop_reason="max_tokens")
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=scripted_server.url)
    page.goto(scripted_server.url)
    send(page, "Write at length")
    answered(page, 1)
    answer = page.locator(ANSWER)
    expect(answer.locator("[data-testid=message-status]")).to_have_text("Cut off at the length limit.")
    answer.locator("[data-testid=continue]").click()
    answered(page, 1)
    expect(answer.locator("[data-testid=message-text]")).to_have_text("The answer starts here" + CONTINUATION)
    expect(answer.locator("[data-testid=continue]")).to_have_count(0)
    expect(answer.locator("[data-testid=message-status]")).to_be_hidden()
    # The upstream got the partial answer as the last (assistant) turn, to continue from.
    last = scripted_model.requests[-1]["messages"][-1]
    assert (last["role"], text_of(last).strip()) == ("assistant", "The answer starts here")
    conversation_id = conversation_in_url(page)
    assert active_path(scripted_server, conversation_id) == ["Write at length", "The answer starts here" + CONTINUATION]

    answer.locator("[data-testid=copy-message]").click()
    expect(answer.locator("[data-testid=copy-message]")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "The answer starts here" + CONTINUATION
    save_screenshot(page, "branches-continued")


def make_conversation(server, text: str) -> str:
    """A conversation with one answer, made over SSE; its id."""
    with httpx.stream("POST", f"{server.url}/api/command-center/message", json={"message": text}, timeout=30) as res:
        body = "".join(res.iter_text())
    return re.search(r'"conversationId":\s*"([^"]+)"', body).group(1)


def test_the_list_renames_deletes_after_a_confirmation_pages_and_searches(page, tmp_path_factory, scripted_model):
    own = RelayServer(tmp_path_factory.mktemp("list"), {
        "ANTHROPIC_API_KEY": "sk-browser-tests", "ANTHROPIC_BASE_URL": scripted_model.url})
    try:
        made = {text: make_conversation(own, text) for text in ("Apples", "Bananas", "Cherry apples")}
        items = page.locator("[data-testid=conversation-item]")
        page.goto(own.url + "/?pageSize=2")
        expect(items).to_have_text([re.compile("^Cherry apples"), re.compile("^Bananas")])
        page.click("[data-testid=load-older]")
        expect(items).to_have_count(3)
        expect(page.locator("[data-testid=load-older]")).to_be_hidden()

        page.fill("[data-testid=conversation-search]", "APPLE")
        expect(items).to_have_count(2)
        expect(page.locator("[data-testid=conversation-name]")).to_have_text(["Cherry apples", "Apples"])
        page.fill("[data-testid=conversation-search]", "")
        expect(items).to_have_count(2)  # the first page again

        # Rename in place; Escape would have kept the old title.
        item = page.locator(f"li[data-conversation-id='{made['Bananas']}']")
        item.locator("[data-testid=rename-conversation]").click()
        field = item.locator("[data-testid=rename-input]")
        expect(field).to_have_value("Bananas")
        field.fill("   ")
        field.press("Enter")
        expect(field).to_be_visible()  # refused (the field's own check, or the server's 400): still editing
        field.fill("Yellow fruit")
        field.press("Enter")
        expect(item.locator("[data-testid=conversation-name]")).to_have_text("Yellow fruit")
        titles = {c["id"]: c["title"] for c in httpx.get(own.url + "/api/conversations").json()["conversations"]}
        assert titles[made["Bananas"]] == "Yellow fruit"

        # Delete asks first; keeping it keeps it.
        item.locator("[data-testid=delete-conversation]").click()
        item.locator("[data-testid=cancel-delete]").click()
        expect(item.locator("[data-testid=confirm-delete]")).to_have_count(0)
        assert httpx.get(f"{own.url}/api/conversations/{made['Bananas']}/messages").status_code == 200
        item.locator("[data-testid=delete-conversation]").click()
        save_screenshot(page, "list-delete-confirmation")
        item.locator("[data-testid=confirm-delete]").click()
        expect(item).to_have_count(0)
        assert httpx.get(f"{own.url}/api/conversations/{made['Bananas']}/messages").status_code == 404

        # Deleting the open conversation leaves an empty new one.
        page.click(f"[data-testid=conversation-item][data-conversation-id='{made['Cherry apples']}']")
        expect(page.locator("[data-testid=conversation-title]")).to_have_text("Cherry apples")
        open_item = page.locator(f"li[data-conversation-id='{made['Cherry apples']}']")
        open_item.locator("[data-testid=delete-conversation]").click()
        open_item.locator("[data-testid=confirm-delete]").click()
        expect(page.locator("[data-testid=conversation-title]")).to_have_text("New conversation")
        expect(page.locator(MESSAGE)).to_have_count(0)
        assert page.evaluate("location.hash") == ""
        expect(page.locator("[data-testid=conversation-name]")).to_have_text(["Apples"])
    finally:
        own.stop()
        assert_no_traceback(own)
