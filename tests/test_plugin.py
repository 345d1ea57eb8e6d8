"""The twistd plugin is discoverable, from the editable install and from a regular ``pip install .``."""

import os
import shutil
import subprocess
import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import TestCase


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def twistd(testcase, args, cwd, env=None, isolated=False):
    """
    The output of ``twistd <args>`` run from ``cwd`` (``isolated``: without site-packages' .pth files), failing
    ``testcase`` unless it exits with status 0.
    """
    code = f"import sys; from twisted.scripts.twistd import run; sys.argv = ['twistd'] + {args!r}; run()"
    argv = [sys.executable] + (["-S"] if isolated else []) + ["-c", code]
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    testcase.assertEqual(result.returncode, 0, result.stdout[-500:] + result.stderr[-1000:])
    return result.stdout


def twistd_commands(testcase, cwd, env=None, isolated=False):
    """The command names that ``twistd --help`` lists."""
    output = twistd(testcase, ["--help"], cwd, env, isolated)
    testcase.assertIn("Commands:", output)
    return [line.split()[0] for line in output.split("Commands:", 1)[1].splitlines() if line.strip()]


class PluginTests(TestCase):
    def test_get_plugins_finds_mterelay(self):
        """getPlugins(IServiceMaker) yields the mterelay service maker, pointing at mterelay.tap."""
        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("mterelay", makers)
        self.assertEqual(makers["mterelay"].module, "mterelay.tap")

    def test_twistd_lists_mterelay_from_any_directory(self):
        """twistd --help, run outside the checkout, lists the mterelay command (editable install)."""
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        self.assertIn("mterelay", twistd_commands(self, cwd))

    def test_regular_install_lists_mterelay(self):
        """
        A regular (non-editable) install of the package into a fresh directory is found by twistd and loads: the
        command's own options come from mterelay.tap, which imports every subpackage.
        """
        work = os.path.abspath(self.mktemp())
        source = os.path.join(work, "src-copy")
        # Copy only what the build needs, keeping src/twisted a symlink like the checkout.
        shutil.copytree(os.path.join(ROOT, "src", "mterelay"), os.path.join(source, "src", "mterelay"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(os.path.join(ROOT, "twisted"), os.path.join(source, "twisted"),
                        ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"))
        os.symlink("../twisted", os.path.join(source, "src", "twisted"))
        for name in ("pyproject.toml", "README.rst"):
            shutil.copy(os.path.join(ROOT, name), source)
        target = os.path.join(work, "site")
        # No build isolation: the build tools are test extras, so building needs no package index.
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", target,
             source],
            capture_output=True, text=True, timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-1000:])
        self.assertTrue(os.path.isfile(os.path.join(target, "twisted", "plugins", "mterelay_plugin.py")))
        self.assertFalse(os.path.exists(os.path.join(target, "twisted", "__init__.py")))
        # Run with the installed copy first on the path and the checkout hidden: -S skips the editable .pth, and
        # the dependencies come from this environment's site-packages, named explicitly.
        site_packages = [p for p in sys.path if p.endswith("site-packages")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([target] + site_packages))
        cwd = os.path.join(work, "run")
        os.makedirs(cwd)
        code = "import mterelay, sys; print(mterelay.__file__)"
        where = subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
        self.assertTrue(where.stdout.startswith(target), where.stdout + where.stderr)
        self.assertIn("mterelay", twistd_commands(self, cwd, env, isolated=True))
        self.assertIn("--upstream=", twistd(self, ["mterelay", "--help"], cwd, env, isolated=True))
