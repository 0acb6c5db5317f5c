"""Go Machinery's integration scenarios on the embedded SQLite broker and backend (one shared file)."""

from pathlib import Path

from machinery import Config
from scenarios import ScenarioSuite


class TestSQLiteScenarios(ScenarioSuite):
    def make_config(self, tmp_path: Path) -> Config:
        url = f"sqlite:///{tmp_path / 'scenarios.sqlite3'}"
        return Config(broker=url, result_backend=url)
