# Sourced by the peer/bench scripts: one Python venv for every peer tool, kept in
# $MFX_PEERS_DIR (outside the repo) so the repo stays clean and reruns are fast.
# Pinned in scripts/requirements-peers.txt.

PEERS="${MFX_PEERS_DIR:-/work/.peers}"
MFX_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MFX_SHARED="${MFX_SHARED:-$MFX_REPO_ROOT/../shared}"

ensure_venv() {
    local req="$MFX_REPO_ROOT/scripts/requirements-peers.txt"
    local stamp="$PEERS/venv/.req-stamp"
    if [[ ! -x "$PEERS/venv/bin/python" ]]; then
        python3 -m venv "$PEERS/venv"
    fi
    # Reinstall only when the requirements file changed.
    if [[ ! -f "$stamp" ]] || ! cmp -s "$req" "$stamp"; then
        "$PEERS/venv/bin/pip" install -q -r "$req"
        cp "$req" "$stamp"
    fi
}
