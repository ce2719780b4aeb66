"""Issue 17 item 4: in a cluster (``--public-only``) a dataset URL reaches public addresses only.

Every connection goes to 127.0.0.1 and nowhere else: names are mapped to addresses by a resolver
the test controls (``steps.fetch_dataset.RESOLVER``), 127.0.0.1 is allowed with ``--allow-cidr``
as an admin would allow a trusted mirror, and every refused address is refused *before* a
connection is made (the servers count what reached them).
"""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import steps.fetch_dataset as fetch_module
from stepkit.common import RetryableError, StepError, run_step
from steps.fetch_dataset import FetchConfig, fetch_dataset, main
from steps.fetch_dataset.egress import EgressPolicy, EgressRefused

ROWS = [{"prompt": f"question {i}?", "completion": f"answer {i}."} for i in range(30)]
LOOPBACK = ("127.0.0.1/32",)


def parquet_bytes(rows) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


class Resolver:
    """Names → addresses, as the test says; records every lookup. ``answers`` may be a list of
    lists: one per lookup (DNS rebinding), the last repeating."""

    def __init__(self, table: dict[str, list]) -> None:
        self.table, self.lookups = table, []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        answer = self.table.get(host)
        if answer is None:
            raise OSError(f"no such host {host} in the test's resolver")
        if answer and isinstance(answer[0], list):
            n = sum(1 for h in self.lookups if h == host) - 1
            return answer[min(n, len(answer) - 1)]
        return answer


@pytest.fixture
def resolver(monkeypatch):
    def install(table):
        found = Resolver(table)
        monkeypatch.setattr(fetch_module, "RESOLVER", found)
        return found
    return install


def run(tmp_path, url, **options):
    options.setdefault("allow_cidr", list(LOOPBACK))
    options.setdefault("allow_http", True)
    return fetch_dataset(FetchConfig(url=[url], output_dir=tmp_path / "out", retries=options.pop("retries", 2),
                                     public_only=True, **options))


def port_of(http_files) -> int:
    return int(http_files.base.rsplit(":", 1)[1])


def test_a_public_name_is_fetched_from_the_address_that_was_checked(http_files, tmp_path, resolver):
    http_files.add("public.parquet", parquet_bytes(ROWS))
    lookups = resolver({"data.example.com": ["127.0.0.1"]})
    summary = run(tmp_path, f"http://data.example.com:{port_of(http_files)}/files/public.parquet")
    assert summary["rows"] == len(ROWS) and lookups.lookups == ["data.example.com"]


@pytest.mark.parametrize("host", ["kubernetes.default.svc", "kubernetes.default.svc.cluster.local.", "kubernetes",
                                  "redis.team-a.svc.cluster.local", "metadata.google.internal", "localhost",
                                  "printer.local", "api.corp.example.mycluster.internal"])
def test_cluster_dns_names_are_refused_without_a_lookup(tmp_path, resolver, host):
    lookups = resolver({})
    with pytest.raises(EgressRefused, match="cluster|single-label|metadata|this machine") as error:
        run(tmp_path, f"https://{host}/train.parquet")
    assert lookups.lookups == [] and not isinstance(error.value, RetryableError)


def test_a_custom_cluster_domain_is_refused(tmp_path, resolver):
    resolver({})
    with pytest.raises(EgressRefused, match="cluster-internal"):
        run(tmp_path, "https://api.prod.svc.k8s.corp/train.parquet", cluster_domain="k8s.corp")


@pytest.mark.parametrize(("host", "address"), [
    ("10.0.0.1.nip.io", "10.0.0.1"),            # wildcard DNS naming a private address
    ("metadata.example.com", "169.254.169.254"),  # the cloud metadata endpoint
    ("wire.example.com", "168.63.129.16"),        # Azure's wireserver
    ("svc.example.com", "100.64.0.10"),           # shared address space (pod/service CIDRs)
    ("loop.example.com", "127.0.0.2"),            # loopback outside the admin's allowance
    ("v6.example.com", "::ffff:192.168.1.1"),      # a private IPv4 in IPv6 clothing
    ("ula.example.com", "fd12:3456::1"),
])
def test_names_resolving_to_inner_addresses_are_refused_before_connecting(http_files, tmp_path, resolver, host,
                                                                          address):
    resolver({host: [address]})
    before = len(http_files.requests)
    with pytest.raises(EgressRefused, match=f"resolves to {address}"):
        run(tmp_path, f"http://{host}:{port_of(http_files)}/files/x.parquet")
    assert len(http_files.requests) == before


def test_one_inner_address_among_public_ones_is_enough_to_refuse(tmp_path, resolver):
    resolver({"mixed.example.com": ["127.0.0.1", "10.1.2.3"]})
    with pytest.raises(EgressRefused, match="10.1.2.3"):
        run(tmp_path, "http://mixed.example.com:9/x.parquet")


def test_literal_inner_addresses_and_blocked_ranges_are_refused(tmp_path, resolver):
    resolver({})
    for url in ("http://10.96.0.1/x.parquet", "http://[::1]:8080/x.parquet", "http://169.254.169.254/latest/meta-data"):
        with pytest.raises(EgressRefused):
            run(tmp_path, url)
    with pytest.raises(EgressRefused, match="--block-cidr"):
        run(tmp_path, "http://127.0.0.1:9/x.parquet", block_cidr=["127.0.0.0/8"], allow_cidr=[])


def test_plain_http_and_file_urls_are_refused_unless_allowed(http_files, tmp_path, resolver):
    resolver({})
    url = http_files.add("plain.parquet", parquet_bytes(ROWS))
    with pytest.raises(EgressRefused, match="plain http is refused"):
        run(tmp_path, url, allow_http=False)
    path = tmp_path / "local.parquet"
    path.write_bytes(parquet_bytes(ROWS))
    with pytest.raises(EgressRefused, match="only https"):
        run(tmp_path, path.as_uri())
    assert run(tmp_path, url)["rows"] == len(ROWS)  # the admin allowed http (and 127.0.0.1)


class Redirector:
    """A loopback server whose every answer is a 302 to ``location`` (counts its requests)."""

    def __init__(self) -> None:
        self.location, self.hits = "", 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.hits += 1
                self.send_response(302)
                self.send_header("Location", outer.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]


@pytest.fixture
def redirector():
    server = Redirector()
    yield server
    server.server.shutdown()


@pytest.mark.parametrize("location", ["http://169.254.169.254/latest/meta-data/iam/security-credentials/",
                                      "http://kubernetes.default.svc/api/v1/secrets",
                                      "http://inner.example.com/x.parquet",
                                      "file:///etc/passwd"])
def test_every_redirect_is_checked(tmp_path, resolver, redirector, http_files, location):
    resolver({"start.example.com": ["127.0.0.1"], "inner.example.com": ["10.0.0.8"]})
    redirector.location = location
    before = len(http_files.requests)
    with pytest.raises(StepError) as error:
        run(tmp_path, f"http://start.example.com:{redirector.port}/x.parquet")
    assert not isinstance(error.value, RetryableError)
    assert redirector.hits == 1 and len(http_files.requests) == before


def test_a_redirect_from_https_to_plain_http_is_refused(tmp_path):
    policy = EgressPolicy(allow_http=False)
    policy.check_url("https://data.example.com/x.parquet")
    with pytest.raises(EgressRefused, match="plain http"):
        policy.check_url("http://data.example.com/x.parquet")  # what the request hook sees on the redirect


def test_dns_rebinding_between_connections_is_refused(http_files, tmp_path, resolver):
    """The first lookup answers a public address, the next (the retry after a dropped connection)
    an inner one: the second connection is refused, the inner address never contacted."""
    http_files.add("rebind.parquet", parquet_bytes(ROWS * 50))
    lookups = resolver({"rebind.example.com": [["127.0.0.1"], ["10.0.0.9"]]})
    with pytest.raises(EgressRefused, match="10.0.0.9"):
        run(tmp_path, f"http://rebind.example.com:{port_of(http_files)}/drop-once/rebind.parquet")
    assert lookups.lookups == ["rebind.example.com", "rebind.example.com"]
    assert len(http_files.requests_for("rebind.parquet")) == 1


def test_the_cli_flag_and_exit_code(http_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fetch_module, "RESOLVER", Resolver({"kubernetes.default.svc": ["10.96.0.1"]}))
    code = run_step(main, ["--url", "https://kubernetes.default.svc/api", "--output-dir", str(tmp_path / "o"),
                           "--public-only", "--outputs", str(tmp_path / "outputs")])
    assert code == 2 and "cluster-internal DNS name" in capsys.readouterr().err


# --- never echo what an inner service answered --------------------------------------------------

CREDENTIALS = {"Code": "Success", "AccessKeyId": "ASIAQSECRETKEYID", "SecretAccessKey": "wJalrXUtnSECRETKEY",
               "Token": "IQoJb3JpZ2luX2VjEJr"}


@pytest.mark.parametrize(("name", "body", "secrets"), [
    ("creds.json", json.dumps([CREDENTIALS]).encode(), ["ASIAQSECRETKEYID", "wJalrXUtnSECRETKEY", "IQoJb3JpZ2lu"]),
    ("creds.jsonl", json.dumps(CREDENTIALS).encode() + b"\n", ["ASIAQSECRETKEYID", "wJalrXUtnSECRETKEY"]),
    ("page.csv", b"<html><body>internal admin token=s3cr3t-t0ken</body></html>\n", ["s3cr3t-t0ken", "html"]),
    ("users.csv", b"user,password\nalice,hunter2-secret,extra\n", ["hunter2-secret", "alice"]),
    ("roles.jsonl", b'{"messages": [{"role": "sk-live-ROLEVALUE", "content": "x"}]}\n', ["sk-live-ROLEVALUE"]),
    ("speakers.jsonl", b'{"conversations": [{"from": "sk-live-SPEAKER", "value": "x"}]}\n', ["sk-live-SPEAKER"]),
])
def test_errors_never_echo_row_contents(http_files, tmp_path, name, body, secrets, caplog):
    url = http_files.add(name, body)
    with pytest.raises(StepError) as error:
        fetch_dataset(FetchConfig(url=[url], output_dir=tmp_path / "out", retries=0))
    text = str(error.value) + caplog.text
    for secret in secrets:
        assert secret not in text, text
    assert name in str(error.value)


def test_urls_from_a_file_as_the_cluster_mounts_them(http_files, tmp_path, resolver):
    """Signed URLs reach the step through a mounted Secret (--url-file), never its arguments."""
    resolver({"data.example.com": ["127.0.0.1"]})
    http_files.add("signed.parquet", parquet_bytes(ROWS))
    listed = tmp_path / "dataset-urls.txt"
    listed.write_text(f"http://data.example.com:{port_of(http_files)}/files/signed.parquet?sig=SECRET\n\n")
    summary = fetch_dataset(FetchConfig(url_file=listed, output_dir=tmp_path / "out", public_only=True,
                                        allow_http=True, allow_cidr=list(LOOPBACK)))
    assert summary["rows"] == len(ROWS) and "SECRET" not in json.dumps(summary)
