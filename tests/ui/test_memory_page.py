"""Memory page: the paged browser and an item's page (image, fields, embedding versions, neighbours)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import update
from streamlit.testing.v1 import AppTest

from app.config import get_settings
from app.db.models import Item
from app.db.repo import MetadataRepo
from tests.ui.conftest import UI_APP


def memory_page(item: str | None = None) -> AppTest:
    at = AppTest.from_file(str(UI_APP), default_timeout=60).run()
    if item is not None:
        at.session_state["memory_item"] = item
    return at.switch_page("views/memory.py").run()


def first_items(n: int = 2) -> list[Item]:
    repo = MetadataRepo.from_url(get_settings().resolved_database_url)
    return repo.list_items(limit=n)[0]


def test_browser_pages_and_filters(ui_data: Path) -> None:
    at = memory_page()
    assert not at.exception, at.exception
    assert at.title[0].value == "Memory"
    assert any(c.value == "40 items · page 1 of 2" for c in at.caption)
    assert at.radio(key="memory_view").value == "Grid"  # thumbnails first
    assert sum("class **" in c.value for c in at.caption) == 20
    assert sum("memory?item=" in m.value for m in at.markdown) == 20  # each item its own address
    at.radio(key="memory_view").set_value("Table").run()
    assert len(at.dataframe[0].value) == 20
    at.number_input(key="memory_page").set_value(2).run()
    assert any(c.value == "40 items · page 2 of 2" for c in at.caption)
    at.selectbox(key="memory_page_size").set_value(50).run()  # page 2 no longer exists: back to 1
    assert any(c.value == "40 items · page 1 of 1" for c in at.caption) and len(at.dataframe[0].value) == 40
    at.selectbox(key="memory_split").set_value("train").run()
    assert any(c.value.startswith("40 items") for c in at.caption)


def test_open_an_item_and_go_back(ui_data: Path) -> None:
    at = memory_page()
    item = first_items(1)[0]
    at.selectbox(key="memory_choice").set_value(item.id)
    at.button(key="memory_open").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.title[0].value == "Memory item"
    assert any(item.caption in m.value for m in at.markdown)
    fields = at.dataframe[0].value
    assert item.content_hash in set(fields["value"]) and item.source_uri in set(fields["value"])
    versions = at.dataframe[1].value
    assert list(versions["status"]) == ["embedded"] and bool(versions["live"].iloc[0])
    text = "\n".join(m.value for m in at.markdown)
    assert text.count("attention **") == 4  # its own neighbours, as the fusion weighs them
    at.button(key="memory_back").click().run()
    assert at.title[0].value == "Memory"


def test_missing_source_file_shows_a_placeholder(ui_data: Path) -> None:
    item = first_items(1)[0]
    repo = MetadataRepo.from_url(get_settings().resolved_database_url)
    with repo.session() as s:
        s.execute(update(Item).where(Item.id == item.id).values(source_uri="/gone/away.jpg"))
    at = memory_page(item.id)
    assert not at.exception, at.exception
    assert any("source file is gone" in w.value for w in at.warning)


def test_unknown_item(ui_data: Path) -> None:
    at = memory_page("no-such-item")
    assert at.error and "no-such-item" in at.error[0].value


def test_empty_memory(empty_ui_data: Path) -> None:
    at = memory_page()
    assert not at.exception, at.exception
    assert any("No items" in i.value for i in at.info)


def test_caption_search_and_class_names(ui_data: Path) -> None:
    at = memory_page()
    at.text_input(key="memory_q").set_value("hat").run()
    assert any(c.value.startswith("4 items · page 1 of 1") for c in at.caption), [c.value for c in at.caption]
    assert sum("class **hat**" in c.value for c in at.caption) == 4
    at.radio(key="memory_view").set_value("Table").run()
    assert set(at.dataframe[0].value["class"]) == {"hat"}


def test_an_item_url_opened_directly(ui_data: Path) -> None:
    item = first_items(1)[0]
    at = AppTest.from_file(str(UI_APP), default_timeout=60)
    at.query_params["item"] = item.id
    at.run()
    at = at.switch_page("views/memory.py")
    at.query_params["item"] = item.id
    at.run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Memory item" and any(item.caption in m.value for m in at.markdown)
    at.button(key="memory_back").click().run()
    assert at.title[0].value == "Memory" and "item" not in at.query_params


def test_memory_map_with_an_item_and_its_neighbours(ui_data: Path) -> None:
    at = memory_page()
    at.radio(key="memory_view").set_value("Map").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(c.value.startswith("40 images") and "variance" in c.value for c in at.caption)
    item = first_items(1)[0]
    at.text_input(key="memory_map_item").set_value(item.id).run()
    assert not at.error, [e.value for e in at.error]
    assert any("The query's 8 nearest images" in m.value for m in at.markdown)
    at.text_input(key="memory_map_item").set_value("no-such-item").run()
    assert any("not in the live memory" in i.value for i in at.info)
