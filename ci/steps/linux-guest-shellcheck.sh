#!/usr/bin/env bash
# Lints the guest-image, nested-route and workflow-lint scripts with ShellCheck (Debian package).
set -euo pipefail
cd "$(dirname "$0")/../.."
shellcheck -x ci/images/linux-guest.sh ci/images/l1-host.sh ci/images/lib.sh ci/nested/run.sh \
    ci/steps/linux-guest-*.sh
# These run under busybox sh (or dash on the direct route).
shellcheck -s sh ci/nested/linux-guest-checks.sh ci/nested/boot-times.sh ci/images/init/*.sh
echo "shellcheck: guest image and nested-route scripts clean"
