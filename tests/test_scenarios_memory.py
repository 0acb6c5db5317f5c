from pathlib import Path

from scenarios import ScenarioSuite

from machinery import Config


class TestMemoryScenarios(ScenarioSuite):
    def make_config(self, tmp_path: Path) -> Config:
        return Config(broker="memory://", result_backend="memory://")
