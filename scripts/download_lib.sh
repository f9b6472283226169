# Sourced by download_models.sh and download_first_stages.sh (upstream's downloads).
# `fetch FOLDER URL` downloads URL to FOLDER/model.zip and unzips it there. The download goes to a
# .part file moved into place only when it is whole, so a failed run leaves no truncated zip where
# an earlier good one was; `report` ends the run with one line naming what failed (upstream's
# scripts ran every line regardless and exited 0 with nothing downloaded).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
failed=()

fetch() {
    local folder=$1 url=$2
    mkdir -p "$folder"
    if wget -O "$folder/model.zip.part" "$url" && mv "$folder/model.zip.part" "$folder/model.zip" \
        && unzip -o -q "$folder/model.zip" -d "$folder"; then
        return 0
    fi
    rm -f "$folder/model.zip.part"
    failed+=("$url")
}

report() {
    if ((${#failed[@]})); then
        echo "error: ${#failed[@]} download(s) failed (see above): ${failed[*]}" >&2
        exit 1
    fi
}
