from pathlib import Path

from machinery import Config
from scenarios import ScenarioSuite


class TestMemoryScenarios(ScenarioSuite):
    def make_config(self, tmp_path: Path) -> Config:
        return Config(broker="memory://", result_backend="memory://")
