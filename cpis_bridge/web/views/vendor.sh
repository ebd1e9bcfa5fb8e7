#!/usr/bin/env bash
# Re-vendors the GOV.UK and NHS.UK frontend assets the views serve (only the built files they need), so running the
# service needs no npm. Bump the versions here and in the README, run it, commit the result.
# url(/assets/...) in the built CSS becomes relative, so each copy works under its own prefix (/la/assets, /ed/assets).
set -euo pipefail
GOVUK=6.3.0
NHSUK=10.6.1
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "govuk-frontend@$GOVUK" "nhsuk-frontend@$NHSUK" >/dev/null
mkdir g n && tar xzf "govuk-frontend-$GOVUK.tgz" -C g && tar xzf "nhsuk-frontend-$NHSUK.tgz" -C n
g=g/package/dist/govuk n=n/package/dist/nhsuk
out="$here/static"
rm -rf "$out/govuk" "$out/nhsuk"
mkdir -p "$out/govuk/fonts" "$out/govuk/images" "$out/nhsuk/images"
sed -e 's|url(/assets/|url(|g' -e 's|/\*# sourceMappingURL=[^*]*\*/||' "$g/govuk-frontend.min.css" > "$out/govuk/govuk-frontend.min.css"
sed 's|//# sourceMappingURL=.*$||' "$g/govuk-frontend.min.js" > "$out/govuk/govuk-frontend.min.js"
cp "$g"/assets/fonts/*.woff2 "$out/govuk/fonts/"
cp "$g/assets/images/govuk-crest.svg" "$g/assets/images/favicon.ico" "$out/govuk/images/"
sed -e 's|url(/assets/|url(|g' -e 's|/\*# sourceMappingURL=[^*]*\*/||' "$n/nhsuk-frontend.min.css" > "$out/nhsuk/nhsuk-frontend.min.css"
sed 's|//# sourceMappingURL=.*$||' "$n/nhsuk-frontend.min.js" > "$out/nhsuk/nhsuk-frontend.min.js"
cp "$n"/assets/images/*.svg "$out/nhsuk/images/" 2>/dev/null || true
cp "$n/assets/favicon.ico" "$out/nhsuk/images/" 2>/dev/null || true
printf 'govuk-frontend %s\nnhsuk-frontend %s\n' "$GOVUK" "$NHSUK" > "$out/VERSIONS"
