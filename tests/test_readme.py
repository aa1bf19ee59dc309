"""README statements that code can check: the core snippet runs as printed, `.ci/run` cites a real section."""
import re

from helpers import REPO

README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    """The text under a `## title` or `### title` heading, up to the next heading of any level."""
    match = re.search(rf"^#{{2,3}} {re.escape(title)}\n(.*?)(?=^#)", README, flags=re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def test_core_snippet_runs_with_only_defined_names():
    """The python block of "The core in a few lines", run in a fresh namespace; only its sizes shrink (a narrow
    SiT-B/2 of 8 blocks, 1 sampler step instead of 250) to keep the test fast."""
    code = re.search(r"```python\n(.*?)```", section("The core in a few lines"), flags=re.S).group(1)
    shrink = {"num_steps=250": "num_steps=1",
              'build_model("SiT-B/2", ': 'build_model("SiT-B/2", depth=8, hidden_size=32, num_heads=2, '}
    for printed, small in shrink.items():
        assert printed in code
        code = code.replace(printed, small)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"].loss.shape == (4,) and tuple(namespace["samples"].shape) == (16, 4, 32, 32)


def test_ci_script_cites_a_readme_section_with_its_command():
    script = (REPO / ".ci" / "run").read_text()
    title = re.search(r'# README\.md, "([^"]+)":', script).group(1)
    command = script.strip().splitlines()[-1]
    assert command in section(title)
