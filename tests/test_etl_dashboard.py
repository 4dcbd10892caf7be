"""The analytics dashboard in a real headless Chromium (Debian's), through the gateway.

Data is made through the public API (sign-ups, chats, messages over the socket), loaded by
a real ETL run, and the page is then checked as a person would use it: sign in as admin,
read the leaderboard and its chart, sort, page, open a barber's daily charts; sign in as
that barber and see only their own series; errors shown as readable messages. The happy
paths must log no console error and no failed or refused request.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, Request, Response, async_playwright
from playwright.async_api import Error as PlaywrightError

from tests.etl_support import leaderboard, percentile, run_etl
from tests.stackproc import ADMIN_PASSWORD, ADMIN_USERNAME, StackProcess
from tests.test_chat_support import ChatClient, ChatUser, make_user, socket_url, start_chat
from tests.util import wait_until

CHROMIUM = shutil.which("chromium")
PASSWORD = "correct horse"  # make_user's
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")

# Expected figures for the barber, counted from the script in `scene` below.
EXPECTED = {
    "chats_started": 2,
    "new_customers": 2,
    "returning_customers": 0,
    "customer_messages": 4,
    "barber_messages": 2,
    "replies": 3,
    "unanswered_chats": 1,
}


@dataclass
class Scene:
    barber: ChatUser
    other_barber: ChatUser
    customer: ChatUser
    admin_token: str
    reply_times: list[float]  # seconds from each answered customer message to the barber's answer


@dataclass
class Watch:
    """What a page logged: console errors, uncaught exceptions, failed and refused requests."""

    problems: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", self._failed)
        page.on("response", self._response)

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type in ("error", "warning"):
            self.problems.append(f"console {msg.type}: {msg.text}")

    def _failed(self, request: Request) -> None:
        self.problems.append(f"request failed: {request.method} {request.url} {request.failure}")

    def _response(self, response: Response) -> None:
        self.urls.append(response.url)
        if response.status >= 400:
            self.problems.append(f"HTTP {response.status}: {response.request.method} {response.url}")


def _sent_at(frame: dict[str, Any]) -> float:
    return datetime.fromisoformat(frame["sent_at"].replace("Z", "+00:00")).timestamp()


async def converse(gateway: str, customer: ChatUser, barber: ChatUser, script: list[str]) -> list[dict]:
    """Play ``script`` ('c' customer, 'b' barber) in a new chat through the gateway, each message
    delivered to both sockets before the next is sent, so the stored order is the script's."""
    chat_id = await start_chat(gateway + "/chat", customer, barber)
    sockets = {
        who: await ChatClient.connect(socket_url(gateway, chat_id, user.token, via_gateway=True))
        for who, user in (("c", customer), ("b", barber))
    }
    try:
        for n, who in enumerate(script, start=1):
            await sockets[who].send(f"message {n} from {who}")
            for client in sockets.values():
                await client.wait_messages(n)
        return sockets["c"].messages
    finally:
        for client in sockets.values():
            await client.close()


def answered_delays(frames: list[dict], barber_id: int) -> list[float]:
    """For each customer message that the barber answers: time to the barber's next message."""
    delays, waiting = [], []
    for frame in frames:
        if frame["sender"]["id"] == barber_id:
            delays += [_sent_at(frame) - t for t in waiting]
            waiting = []
        else:
            waiting.append(_sent_at(frame))
    return delays


@pytest.fixture(scope="module")
async def scene(stack: StackProcess, admin_token: str) -> Scene:
    gateway = stack.url("gateway")
    barber = await make_user(stack, "employee", "Dora", "Dashboard")
    other_barber = await make_user(stack, "employee", "Quinn", "Quiet")
    first = await make_user(stack, "customer", "Cleo", "First")
    second = await make_user(stack, "customer", "Milo", "Second")
    # Two questions answered at once, a third answered later; the other chat never answered.
    frames = await converse(gateway, first, barber, ["c", "c", "b", "c", "b"])
    await converse(gateway, second, barber, ["c"])
    await converse(gateway, first, other_barber, ["c"])
    await run_etl(stack, admin_token)
    return Scene(barber, other_barber, first, admin_token, answered_delays(frames, barber.id))


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        # Debian's Chromium: this machine cannot download a browser build of Playwright's own.
        b = await p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh profile per test: nothing in sessionStorage."""
    ctx = await browser.new_context(viewport={"width": 1366, "height": 900})
    ctx.set_default_timeout(30_000)
    try:
        yield ctx
    finally:
        await ctx.close()


async def open_dashboard(stack: StackProcess, context: BrowserContext, fragment: str = "") -> tuple[Page, Watch]:
    page = await context.new_page()
    watch = Watch()
    watch.attach(page)
    await page.goto(stack.url("gateway") + "/etl/dashboard" + fragment)
    try:
        await page.wait_for_selector("#signin-form", state="visible")
    except PlaywrightError as e:
        raise AssertionError(
            f"no sign-in form; the page logged {watch.problems}; alert: {await page.text_content('#alert')!r}"
        ) from e
    return page, watch


async def sign_in(page: Page, username: str, password: str) -> None:
    await page.fill("#username", username)
    await page.fill("#password", password)
    await page.click("#signin-submit")


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def yesterday() -> str:
    return (datetime.now(UTC).date() - timedelta(days=1)).isoformat()


async def chart_data(page: Page, canvas_id: str) -> dict:
    """The chart drawn on a canvas: its labels, datasets, and whether each bar or point has
    been laid out with a size (so it is on the canvas, not only in memory)."""
    return await page.evaluate(
        """(id) => {
            const chart = Chart.getChart(document.getElementById(id));
            if (!chart) return null;
            return {
                labels: chart.data.labels,
                datasets: chart.data.datasets.map((d, i) => ({
                    label: d.label,
                    data: d.data,
                    drawn: chart.getDatasetMeta(i).data.map((e) => e.height > 0 || (e.y !== undefined && !e.skip)),
                })),
            };
        }""",
        canvas_id,
    )


async def painted(page: Page, canvas_id: str, rgb: tuple[int, int, int]) -> int:
    """How many of the canvas's pixels have exactly a dataset's colour: proof it was painted."""
    return await page.evaluate(
        """([id, r, g, b]) => {
            // Read a copy: reading the chart's own canvas back would slow the page's drawing.
            const source = document.getElementById(id);
            const copy = document.createElement("canvas");
            copy.width = source.width;
            copy.height = source.height;
            const ctx = copy.getContext("2d", { willReadFrequently: true });
            ctx.drawImage(source, 0, 0);
            const px = ctx.getImageData(0, 0, copy.width, copy.height).data;
            let n = 0;
            for (let i = 0; i < px.length; i += 4) {
                if (px[i] === r && px[i + 1] === g && px[i + 2] === b && px[i + 3] === 255) n++;
            }
            return n;
        }""",
        [canvas_id, *rgb],
    )


INDIGO = (0x4F, 0x46, 0xE5)  # customer messages in every chart
TEAL = (0x0D, 0x94, 0x88)  # barber messages


async def find_row(page: Page, barber_id: int) -> Any:
    """The barber's leaderboard row, following the page's Next button if it is further down."""
    selector = f'#lb-body tr[data-barber-id="{barber_id}"]'
    for _ in range(100):
        await page.wait_for_selector("#lb-body tr.clickable")
        await page.wait_for_function("() => !document.getElementById('leaderboard').hasAttribute('aria-busy')")
        row = await page.query_selector(selector)
        if row is not None:
            return row
        assert await page.is_enabled("#next"), f"barber {barber_id} is on no page of the leaderboard"
        before = await page.text_content("#page-info")
        await page.click("#next")
        await page.wait_for_function("(b) => document.getElementById('page-info').textContent !== b", arg=before)
    raise AssertionError("too many pages")


async def cells(row: Any) -> dict[str, tuple[str, str]]:
    """metric -> (shown text, exact value) of a leaderboard row."""
    out = {}
    for td in await row.query_selector_all("td[data-metric]"):
        out[await td.get_attribute("data-metric")] = (
            (await td.inner_text()).strip(),
            await td.get_attribute("data-value"),
        )
    return out


# -- admin --------------------------------------------------------------------------------
async def test_admin_sees_the_leaderboard_and_a_barbers_daily_charts(
    stack: StackProcess, scene: Scene, context: BrowserContext
) -> None:
    page, watch = await open_dashboard(stack, context, "#limit=100")
    await sign_in(page, ADMIN_USERNAME, ADMIN_PASSWORD)
    await page.wait_for_selector("#leaderboard-view", state="visible")
    assert await page.is_hidden("#signin-view")
    assert "Admin" in await page.text_content("#who")

    row = await find_row(page, scene.barber.id)
    shown = await cells(row)
    for metric, value in EXPECTED.items():
        assert shown[metric] == (str(value), str(value)), (metric, shown[metric])
    # Reply times: the exact figures the ETL computed from the stored messages, against the
    # delays measured from the socket's timestamps; shown rounded, never as "no data".
    median, p90 = float(shown["reply_time_median_s"][1]), float(shown["reply_time_p90_s"][1])
    assert median == pytest.approx(percentile(scene.reply_times, 0.5), abs=0.05)
    assert p90 == pytest.approx(percentile(scene.reply_times, 0.9), abs=0.05)
    assert shown["reply_time_median_s"][0].endswith(" s") and shown["reply_time_p90_s"][0].endswith(" s")
    assert "Dora Dashboard" in await row.inner_text()

    # The bar chart shows the same page of rows as the table, in the table's order.
    names = [n.strip() for n in await page.locator("#lb-body td.name .strong").all_inner_texts()]
    bars = await wait_until(lambda: chart_data(page, "lb-chart"), message="the leaderboard chart")
    assert bars["labels"] == names
    index = names.index("Dora Dashboard")
    assert bars["datasets"][0]["data"][index] == EXPECTED["customer_messages"]
    assert bars["datasets"][0]["drawn"][index]
    assert await painted(page, "lb-chart", INDIGO) > 50

    # A click on the row opens the barber's daily series for the same period.
    await row.click()
    await page.wait_for_selector(f'#daily-view[data-barber-id="{scene.barber.id}"]', state="visible")
    assert "Dora Dashboard" in await page.text_content("#daily-title")
    assert f"barber={scene.barber.id}" in page.url
    messages = await wait_until(lambda: chart_data(page, "chart-messages"), message="the messages chart")
    # The page's default period: 30 days to today (UTC), as the API's.
    assert len(messages["labels"]) == 30 and messages["labels"][-1] == await page.input_value("#to")
    assert messages["labels"][-1] in (today(), yesterday())  # yesterday only if midnight just passed
    customer_series, barber_series = messages["datasets"]
    assert sum(customer_series["data"]) == EXPECTED["customer_messages"]
    assert sum(barber_series["data"]) == EXPECTED["barber_messages"]
    asked = next(i for i, n in enumerate(customer_series["data"]) if n)
    answered = next(i for i, n in enumerate(barber_series["data"]) if n)
    assert customer_series["drawn"][asked] and barber_series["drawn"][answered]
    chats = await chart_data(page, "chart-chats")
    assert sum(chats["datasets"][0]["data"]) == EXPECTED["chats_started"]
    reply = await chart_data(page, "chart-reply")
    assert [d["label"] for d in reply["datasets"]] == ["Median", "90th percentile"]
    assert reply["datasets"][0]["data"][answered] is not None and reply["datasets"][0]["drawn"][answered]
    # Days without a reply are gaps in the line, not zeros.
    for i, sent in enumerate(barber_series["data"]):
        if not sent:
            assert reply["datasets"][0]["data"][i] is None and reply["datasets"][1]["data"][i] is None
    for canvas, colour in (("chart-messages", INDIGO), ("chart-messages", TEAL)):
        assert await wait_until(lambda: painted(page, canvas, colour), message=f"{canvas} painted")

    assert watch.problems == []
    # Everything came from the gateway: no CDN, nothing from the internet.
    assert all(u.startswith((stack.url("gateway") + "/", "data:")) for u in watch.urls), watch.urls
    assert any(u.endswith("/etl/static/vendor/chartjs/chart.umd.min.js") for u in watch.urls)


async def test_admin_sorts_and_pages_like_the_api(stack: StackProcess, scene: Scene, context: BrowserContext) -> None:
    page, watch = await open_dashboard(stack, context, "#limit=1")
    await sign_in(page, ADMIN_USERNAME, ADMIN_PASSWORD)
    await page.wait_for_selector("#lb-body tr.clickable")
    end = datetime.now(UTC).date()
    api = await leaderboard(stack, scene.admin_token, end - timedelta(days=29), end)  # the page's default period
    assert api["total"] >= 2
    assert await page.text_content("#page-info") == f"1–1 of {api['total']}"
    ids = await page.eval_on_selector_all("#lb-body tr[data-barber-id]", "rows => rows.map(r => +r.dataset.barberId)")
    assert ids == [api["barbers"][0]["barber_id"]]
    assert await page.is_disabled("#prev")
    await page.click("#next")
    await page.wait_for_function("() => document.getElementById('page-info').textContent.startsWith('2–2')")
    ids = await page.eval_on_selector_all("#lb-body tr[data-barber-id]", "rows => rows.map(r => +r.dataset.barberId)")
    assert ids == [api["barbers"][1]["barber_id"]]
    assert "offset=1" in page.url

    # Sorting: a header click asks the API for that order, and the table follows it.
    await page.select_option("#limit", "100")
    await page.click("#range-form button[type=submit]")
    await page.wait_for_function("() => document.getElementById('page-info').textContent.startsWith('1–')")
    # A new column sorts its counts largest first; a second click turns the order round.
    for key, order in (("barber_messages", "desc"), ("barber_messages", "asc"), ("customer_messages", "desc")):
        async with page.expect_response(lambda r: "/etl/analytics/barbers?" in r.url) as response:
            await page.click(f'button.sort[data-sort="{key}"]')
        assert (await response.value).ok
        assert f"sort={key}&order={order}" in (await response.value).url
        aria = "descending" if order == "desc" else "ascending"
        await page.wait_for_selector(f'th[aria-sort="{aria}"] button[data-sort="{key}"]')
        await page.wait_for_function("() => !document.getElementById('leaderboard').hasAttribute('aria-busy')")
        values = [
            int(v)
            for v in await page.eval_on_selector_all(
                f'#lb-body td[data-metric="{key}"]', "tds => tds.map(td => td.dataset.value)"
            )
        ]
        assert values == sorted(values, reverse=order == "desc")
        assert values, "no rows"
    assert "Barber msgs" not in await page.text_content("#lb-chart-title")  # titles use the full label
    assert await page.text_content("#lb-chart-title") == "Customer messages by barber"
    assert watch.problems == []


async def test_a_pasted_token_works_and_a_bad_one_sends_back_to_sign_in(
    stack: StackProcess, scene: Scene, context: BrowserContext
) -> None:
    page, watch = await open_dashboard(stack, context)
    await page.click(".token-entry summary")
    await page.fill("#token-input", f"Bearer {scene.admin_token}")
    await page.click("#token-submit")
    await page.wait_for_selector("#lb-body tr[data-barber-id]")
    assert watch.problems == []

    # A token whose signature is wrong: the API refuses it and the page says so.
    await page.click("#signout")
    await page.wait_for_selector("#signin-view", state="visible")
    assert await page.evaluate("sessionStorage.length") == 0
    head, payload, signature = scene.admin_token.split(".")
    forged = f"{head}.{payload}.{signature[:-4]}AAAA"
    await page.click(".token-entry summary")
    await page.fill("#token-input", forged)
    await page.click("#token-submit")
    await page.wait_for_selector("#alert", state="visible")
    assert "sign in again" in await page.text_content("#alert")
    assert await page.is_visible("#signin-view") and await page.is_hidden("#leaderboard-view")
    assert await page.evaluate("sessionStorage.length") == 0
    assert [p for p in watch.problems if "401" not in p] == []

    # A wrong password is a message too, not a blank page.
    await sign_in(page, ADMIN_USERNAME, "not the password")
    await page.wait_for_function("() => document.getElementById('alert').textContent.includes('Wrong username')")


# -- barber and customer -----------------------------------------------------------------
async def test_a_barber_sees_only_their_own_series(stack: StackProcess, scene: Scene, context: BrowserContext) -> None:
    page, watch = await open_dashboard(stack, context)
    await sign_in(page, scene.barber.username, PASSWORD)
    await page.wait_for_selector(f'#daily-view[data-barber-id="{scene.barber.id}"]', state="visible")
    assert await page.is_hidden("#leaderboard-view")
    assert (await page.text_content("#daily-title")).startswith("Your figures")
    assert "Barber" in await page.text_content("#who")
    messages = await wait_until(lambda: chart_data(page, "chart-messages"), message="the messages chart")
    assert sum(messages["datasets"][0]["data"]) == EXPECTED["customer_messages"]
    assert sum(messages["datasets"][1]["data"]) == EXPECTED["barber_messages"]
    assert await wait_until(lambda: painted(page, "chart-messages", INDIGO), message="the messages chart painted")
    analytics = [u for u in watch.urls if "/etl/analytics/" in u]
    assert analytics and all(f"/etl/analytics/barbers/{scene.barber.id}/daily?" in u for u in analytics), analytics
    kpis = dict(
        await page.eval_on_selector_all(
            "#kpis .kpi",
            "ks => ks.map(k => [k.querySelector('.kpi-label').textContent, k.querySelector('.kpi-value').textContent])",
        )
    )
    assert kpis["Customer messages"] == str(EXPECTED["customer_messages"])
    assert kpis["Barber messages"] == str(EXPECTED["barber_messages"])
    assert kpis["Chats started"] == str(EXPECTED["chats_started"])
    assert watch.problems == []

    # A range the API refuses: its reason is shown, and the charts stay.
    await page.fill("#daily-from", "2020-01-01")
    async with page.expect_response(lambda r: "/daily?" in r.url) as response:
        await page.click("#daily-range-form button[type=submit]")
    assert (await response.value).status == 400
    await page.wait_for_selector("#alert", state="visible")
    alert = await page.text_content("#alert")
    assert alert.startswith("The request was refused") and "366" in alert
    assert await page.is_visible("#chart-messages")

    await page.click("#signout")
    await page.wait_for_selector("#signin-view", state="visible")
    assert await page.evaluate("sessionStorage.length") == 0


async def test_a_customer_is_told_there_is_nothing_to_see(
    stack: StackProcess, scene: Scene, context: BrowserContext
) -> None:
    page, watch = await open_dashboard(stack, context)
    await sign_in(page, scene.customer.username, PASSWORD)
    await page.wait_for_selector("#nothing-view", state="visible")
    assert await page.is_hidden("#leaderboard-view") and await page.is_hidden("#daily-view")
    assert watch.problems == []
