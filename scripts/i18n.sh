#!/usr/bin/env bash
# The gettext catalogs (edge_agent/locale, domain edge_agent), managed with Babel:
#   scripts/i18n.sh            extract the marked strings into the template, update each .po, compile the .mo
#   scripts/i18n.sh compile    compile only (what setup runs: the .po files are committed, the .mo are built)
# A new string gets an empty msgstr in each .po: translate it there (tests/test_i18n.py fails until then).
set -euo pipefail
cd "$(dirname "$0")/.."
pybabel=.venv/bin/pybabel
locale=edge_agent/locale
if [ "${1:-all}" != compile ]; then
  "$pybabel" -q extract -F babel.cfg -k N_ --no-location --sort-output --project edge-agent \
    --msgid-bugs-address "edge-agent maintainers" -o "$locale/edge_agent.pot" .
  for lang in zh_CN; do
    if [ -f "$locale/$lang/LC_MESSAGES/edge_agent.po" ]; then
      "$pybabel" -q update -D edge_agent -i "$locale/edge_agent.pot" -d "$locale" -l "$lang" \
        --no-fuzzy-matching --omit-header --ignore-obsolete
    else
      "$pybabel" -q init -D edge_agent -i "$locale/edge_agent.pot" -d "$locale" -l "$lang"
    fi
  done
fi
"$pybabel" -q compile -D edge_agent -d "$locale" --use-fuzzy=false 2>/dev/null || "$pybabel" -q compile -D edge_agent -d "$locale"
