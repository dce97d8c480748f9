"""The README's tables are generated from the code they describe; these tests keep them current."""
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from titan_fusion.server.metrics import Metrics
from titan_fusion.server.settings import settings_markdown

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_configuration_table_is_current():
    m = re.search(r"<!-- BEGIN config table.*?-->\n(.*?)\n<!-- END config table -->", README, re.S)
    assert m, "README lost its configuration table markers"
    assert m.group(1).strip() == settings_markdown().strip(), \
        "README configuration table is stale: paste settings_markdown() between the markers"


def test_readme_metrics_table_is_the_metrics_module_docstring():
    from titan_fusion.server import metrics
    m = re.search(r"<!-- BEGIN metrics table.*?-->\n(.*?)\n<!-- END metrics table -->", README, re.S)
    assert m, "README lost its metrics table markers"
    assert m.group(1).strip() == "\n".join(l for l in metrics.__doc__.splitlines() if l.startswith("|")).strip()


def test_readme_metrics_table_names_every_metric_and_only_those():
    registry = CollectorRegistry()
    Metrics(registry)
    exported = {m.name for m in registry.collect()}
    # prometheus_client names counters without their _total suffix
    documented = {re.sub(r"_total$", "", n) for n in re.findall(r"^\| `(fusion_[a-z_]+)` \|", README, re.M)}
    assert documented == exported


def test_data_attribution_ships_with_the_data():
    text = (ROOT / "data" / "README.md").read_text()
    assert "CC0" in text and (ROOT / "data" / "BTC-USD-15-MIN.csv").exists()
