"""policy_file: TOML to Policy, errors with FILE:LINE, and the JSON round trip."""

import json
import re
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.policy.model import GroupPolicy, Policy, PolicyError, TargetRule, UserPolicy, parse_target_rule
from bastion.ops.policy_files import load_policy_file
from bastion.policy.file import (
    PolicyFileError,
    check_key_line,
    parse_policy,
    policy_from_dict,
    policy_to_dict,
)

ALICE_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINENcl9aqFLzSvX7n9cWleGiAZplTIboPtLtlNjcQGAz "
             "alice@example")
ECDSA_KEY = ("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBOsq8u9iSrct0"
             "8jVcTAmzCzJNxWX8Js/HZb2+nk/uJtD0TXcGAKgqji8c+EKLobuFQ3gEvOeuAwfzfiON/CIkCU=")
UTC = timezone.utc

SPEC_EXAMPLE = f"""\
[groups.ops]
allow = ["10.20.0.0/16:22", "*.db.corp.internal:5432", "[fd00:1::/64]:22,443"]

[users.alice]
keys = ["{ALICE_KEY}"]   # optional
groups = ["ops"]
allow = ["10.1.2.3:22,8000-8100", {{target = "10.9.9.9:22", expires = 2026-12-01T18:00:00Z}}]
deny = ["10.20.0.9"]
expires = 2027-01-31T00:00:00Z               # optional, must carry a timezone
"""


def rule(text, deny=False, expires=None):
    parsed = parse_target_rule(text, any_port_when_omitted=deny)
    return TargetRule(parsed.text, parsed.network, parsed.name_pattern, parsed.ports, expires)


def test_parses_the_documented_example():
    policy = parse_policy(SPEC_EXAMPLE, "example.toml")
    assert policy == Policy(
        users={"alice": UserPolicy(
            name="alice",
            groups=("ops",),
            allow=(rule("10.1.2.3:22,8000-8100"),
                   rule("10.9.9.9:22", expires=datetime(2026, 12, 1, 18, tzinfo=UTC))),
            deny=(rule("10.20.0.9", deny=True),),
            expires=datetime(2027, 1, 31, tzinfo=UTC),
            keys=(ALICE_KEY,),
        )},
        groups={"ops": GroupPolicy("ops", allow=(
            rule("10.20.0.0/16:22"), rule("*.db.corp.internal:5432"), rule("[fd00:1::/64]:22,443")))},
    )
    assert str(policy.users["alice"].deny[0].ports) == "*"  # a deny without ports errs wide


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing here yet\n", "[users]\n[groups]\n"])
def test_empty_files_are_empty_policies(text):
    assert parse_policy(text) == Policy()


def test_keys_absent_empty_and_given():
    policy = parse_policy('[users.a]\n[users.b]\nkeys = []\n[users.c]\nkeys = ["%s"]\n' % ECDSA_KEY)
    assert [policy.users[n].keys for n in "abc"] == [None, (), (ECDSA_KEY,)]


def test_times_with_offsets_are_stored_in_utc():
    policy = parse_policy("[users.a]\nexpires = 2026-04-01T02:00:00+02:00\n"
                          'allow = [{target = "10.0.0.1", expires = 2026-04-01T00:00:00.5Z}]\n')
    user = policy.users["a"]
    assert user.expires == datetime(2026, 4, 1, tzinfo=UTC)
    assert user.expires.utcoffset() == timedelta(0)
    assert user.allow[0].expires == datetime(2026, 4, 1, 0, 0, 0, 500000, tzinfo=UTC)


def test_alternative_toml_spellings_of_the_same_policy():
    dotted = 'users.alice.allow = ["10.0.0.1"]\nusers.alice.groups = ["ops"]\ngroups.ops = {}\n'
    inline = '[users]\nalice = { allow = ["10.0.0.1"], groups = ["ops"] }\n[groups.ops]\n'
    assert parse_policy(dotted) == parse_policy(inline) == Policy(
        users={"alice": UserPolicy("alice", groups=("ops",), allow=(rule("10.0.0.1"),))},
        groups={"ops": GroupPolicy("ops")},
    )


def test_unknown_groups_load_and_are_reported_as_problems():
    policy = parse_policy('[users.alice]\ngroups = ["ops"]\n')
    assert policy.problems() == ["user alice names unknown group 'ops'"]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        # TOML syntax, reformatted from tomllib's "(at line N, column M)"
        ("[users.alice\n", 1, "Expected ']'"),
        ('[users.alice]\nallow = ["10.0.0.1"\n', 3, "expected valid TOML"),
        ("[users.alice]\n\nallow = \n", 3, "Invalid value at column 9"),
        ("[users.alice]\n[users.alice]\n", 2, "expected valid TOML"),
        ("a = 1\0\n", 1, "expected valid TOML"),
        # structure
        ("version = 1\n", 1, "unknown top-level key 'version'; expected [users.NAME] or [groups.NAME]"),
        ("[[users]]\nname = 'x'\n", 1, "users must be a table"),
        ("users = 3\n", 1, "users must be a table"),
        ("[users]\nalice = 3\n", 2, "users.alice must be a table"),
        ("[users.alice]\nfoo = 1\n", 2, "users.alice has unknown key 'foo'; allowed keys are keys, groups, allow, deny, listen, expires"),
        ("[groups.ops]\nexpires = 2027-01-01T00:00:00Z\n", 2, "allowed keys are allow, deny, listen"),
        ("[groups.ops]\nkeys = []\n", 2, "groups.ops has unknown key 'keys'"),
        # names
        ("[users.Alice]\n", 1, "user name 'Alice' is not valid"),
        ("[users.9lives]\n", 1, "user name '9lives' is not valid"),
        ('[users."al ice"]\n', 1, "user name 'al ice' is not valid"),
        ("[users.%s]\n" % ("a" * 33), 1, "is not valid"),
        ("[groups.OPS]\n", 1, "group name 'OPS' is not valid"),
        ('[users.alice]\ngroups = ["Ops"]\n', 2, "users.alice.groups: group name 'Ops' is not valid"),
        ('[users.alice]\ngroups = "ops"\n', 2, "users.alice.groups must be a list of group names"),
        # rule lists
        ('[users.alice]\nallow = "10.0.0.1"\n', 2, "users.alice.allow must be a list of strings or {target, expires} tables"),
        ("[users.alice]\nallow = [22]\n", 2, "must be a list of strings or {target, expires} tables"),
        ('[users.alice]\n\nallow = [\n  "10.1.2.3:22",\n  "10.0.0.1/8",\n]\n', 5, "'10.0.0.1/8' has host bits set"),
        ('[users.alice]\nallow = ["10.1.2.3:0"]\n', 2, "port"),
        ('[users.alice]\nallow = ["10.1.2.3:70000"]\n', 2, "out of range"),
        ('[users.alice]\nallow = ["10.1.2.3:22-21"]\n', 2, "runs backwards"),
        ('[users.alice]\nallow = ["10.0.0.0/33"]\n', 2, "longer than /32"),
        ('[users.alice]\nallow = ["256.1.1.1"]\n', 2, "not a valid IPv4 address"),
        ('[users.alice]\nallow = ["fd00::1"]\n', 2, "brackets"),
        ('[users.alice]\nallow = ["bad host"]\n', 2, "whitespace; expected HOST[:PORTS]"),
        ('[users.alice]\nallow = ["h\u043est"]\n', 2, "non-ASCII"),
        ('[users.alice]\ndeny = ["*"]\n', 2, "users.alice.deny: name pattern '*' needs a literal last label"),
        ('[groups.ops]\nallow = [{target = "10.0.0.1", until = 2027-01-01T00:00:00Z}]\n', 2,
         "unknown key 'until'; allowed keys are target, expires"),
        ('[groups.ops]\nallow = [{expires = 2027-01-01T00:00:00Z}]\n', 2, "needs target"),
        ('[groups.ops]\nallow = [{target = "10.0.0.1", expires = 2027-01-01T00:00:00}]\n', 2, "has no timezone"),
        ('[groups.ops]\nallow = [{target = "10.0.0.1", expires = "2027-01-01T00:00:00Z"}]\n', 2, "is not a date-time"),
        # expiry
        ("[users.alice]\nexpires = 2027-01-31T00:00:00\n", 2, "users.alice.expires has no timezone; expected a TOML date-time with a timezone"),
        ("[users.alice]\nexpires = 2027-01-31\n", 2, "users.alice.expires is not a date-time"),
        ("[users.alice]\nexpires = 1\n", 2, "is not a date-time"),
        # keys
        ('[users.alice]\nkeys = "%s"\n' % ALICE_KEY, 2, "users.alice.keys must be a list of OpenSSH public key lines"),
        ('[users.alice]\nkeys = ["ssh-dss AAAAB3NzaC1kc3M= x"]\n', 2, "key 1: key type 'ssh-dss' is not one of"),
        ('[users.alice]\nkeys = ["ssh-ed25519 not*base64 x"]\n', 2, "not valid base64"),
        ('[users.alice]\nkeys = ["ssh-ed25519"]\n', 2, "TYPE BASE64"),
        ('[users.alice]\nkeys = ["ssh-rsa %s"]\n' % ALICE_KEY.split()[1], 2, "does not start with its type"),
        ('[users.alice]\nkeys = [\n  "%s",\n  "%s",\n  "ssh-ed25519 AAAA",\n]\n' % (ALICE_KEY, ECDSA_KEY), 5, "key 3"),
    ],
)
def test_errors_name_file_line_and_expectation(text, line, message):
    with pytest.raises(PolicyFileError) as caught:
        parse_policy(text, "team.toml")
    error = str(caught.value)
    assert error.startswith(f"team.toml:{line}: "), error
    assert message in error, error


def test_the_line_of_a_later_users_error_is_found():
    text = ("[users.bob]\nallow = [\"10.0.0.1\"]\n\n[users.alice]\n# allow bob's box too\n"
            "allow = [\"10.0.0.1\", \"10.0.0.2:0\"]\n")
    with pytest.raises(PolicyFileError, match=r"^p:6: users\.alice\.allow"):
        parse_policy(text, "p")


def test_load_policy_file(tmp_path):
    path = tmp_path / "team.toml"
    path.write_text(SPEC_EXAMPLE)
    assert load_policy_file(path) == parse_policy(SPEC_EXAMPLE)
    assert load_policy_file(str(path)) == parse_policy(SPEC_EXAMPLE)


def test_load_policy_file_errors(tmp_path):
    with pytest.raises(PolicyFileError, match="missing.toml: cannot read the file"):
        load_policy_file(tmp_path / "missing.toml")
    with pytest.raises(PolicyFileError, match="cannot read the file"):
        load_policy_file(tmp_path)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"# ok\n# caf\xe9\n")
    with pytest.raises(PolicyFileError, match=r"latin\.toml:2: not UTF-8 text"):
        load_policy_file(latin)
    bad = tmp_path / "bad.toml"
    bad.write_text('[users.alice]\nallow = ["10.0.0.1:0"]\n')
    with pytest.raises(PolicyFileError, match=rf"^{re.escape(str(bad))}:2: "):
        load_policy_file(bad)


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa", "rsa"])
def test_check_key_line_accepts_real_ssh_keygen_keys(tmp_path, key_type):
    path = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", "me@host", "-f", str(path)],
                   check=True, timeout=60)
    line = (tmp_path / "id.pub").read_text().strip()
    assert check_key_line(line) == line
    assert check_key_line(" ".join(line.split()[:2])) == " ".join(line.split()[:2])


@pytest.mark.parametrize(
    "line",
    ["", "ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAINENcl9aqFLzSvX7n9cWleGiAZplTIboPtLtlNjcQGAz",
     "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINENcl9aqFLzSvX7n9cWleGiAZplTIboPtLtlNjcQGAz\nx",
     "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINENcl9aqFLzSvX7n9cWleGiAZplTIboPtLtlNjcQGA",
     "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINENcl9aqFLzSvX7n9cWleGiAZplTIboPtLtlNjcQGAz caf\u00e9",
     "SSH-ED25519 AAAAC3NzaC1lZDI1NTE5AAAAINENcl9aqFLzSvX7n9cWleGiAZplTIboPtLtlNjcQGAz",
     'command="sh" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINENcl9aqFLzSvX7n9cWleGiAZplTIboPtLtlNjcQGAz',
     "ecdsa-sha2-nistp384 " + ECDSA_KEY.split()[1]],
)
def test_check_key_line_refuses(line):
    with pytest.raises(PolicyError):
        check_key_line(line)


# ---- JSON round trip ------------------------------------------------------------------------

def test_policy_to_dict_shape():
    data = policy_to_dict(parse_policy(SPEC_EXAMPLE))
    assert data == {
        "users": {"alice": {
            "groups": ["ops"],
            "allow": ["10.1.2.3:22,8000-8100",
                      {"target": "10.9.9.9:22", "expires": "2026-12-01T18:00:00Z"}],
            "deny": ["10.20.0.9"],
            "listen": [],
            "expires": "2027-01-31T00:00:00Z",
            "keys": [ALICE_KEY],
        }},
        "groups": {"ops": {"allow": ["10.20.0.0/16:22", "*.db.corp.internal:5432",
                                     "[fd00:1::/64]:22,443"], "deny": [], "listen": []}},
    }
    assert policy_from_dict(json.loads(json.dumps(data))) == parse_policy(SPEC_EXAMPLE)


def test_policy_from_dict_fills_defaults():
    assert policy_from_dict({}) == Policy()
    assert policy_from_dict({"users": {"a": {}}}) == Policy(users={"a": UserPolicy("a")})


@pytest.mark.parametrize(
    "data",
    [
        {"users": []},
        {"users": {"A": {}}},
        {"users": {"a": {"allow": ["10.0.0.1:0"]}}},
        {"users": {"a": {"allow": [{"expires": "2027-01-01T00:00:00Z"}]}}},
        {"users": {"a": {"expires": "2027-01-01T00:00:00"}}},
        {"users": {"a": {"expires": "soon"}}},
        {"users": {"a": {"keys": ["nope"]}}},
        {"users": {"a": {"groups": 5}}},
        {"groups": {"g": {"deny": [3]}}},
    ],
)
def test_policy_from_dict_refuses_bad_data(data):
    with pytest.raises(PolicyFileError):
        policy_from_dict(data)


names = st.from_regex(r"[a-z_][a-z0-9_.-]{0,31}", fullmatch=True)
targets = st.sampled_from([
    "10.1.2.3", "10.1.2.3:22,8000-8100", "10.20.0.0/16:22", "10.0.0.0/8:*", "127.1:22",
    "*.db.corp.internal:5432", "git.corp.internal", "[fd00:1::/64]:22,443", "[fd00::1]",
    "[::ffff:10.0.0.0/104]:22",
])
times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                     timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]))


@st.composite
def rules_(draw, deny):
    text, expires = draw(targets), draw(st.none() | times)
    return rule(text, deny=deny, expires=None if expires is None else expires.astimezone(UTC))


@st.composite
def policies(draw):
    users = {name: UserPolicy(
        name=name,
        groups=tuple(draw(st.lists(names, max_size=3))),
        allow=tuple(draw(st.lists(rules_(False), max_size=3))),
        deny=tuple(draw(st.lists(rules_(True), max_size=2))),
        expires=draw(st.none() | times.map(lambda t: t.astimezone(UTC))),
        keys=draw(st.none() | st.lists(st.sampled_from([ALICE_KEY, ECDSA_KEY]), max_size=2).map(tuple)),
    ) for name in draw(st.lists(names, max_size=4, unique=True))}
    groups = {name: GroupPolicy(name, tuple(draw(st.lists(rules_(False), max_size=3))),
                                tuple(draw(st.lists(rules_(True), max_size=2))))
              for name in draw(st.lists(names, max_size=3, unique=True))}
    return Policy(users, groups)


def to_toml(policy):
    """A small TOML writer for the round-trip property (bastion itself never writes TOML)."""
    def rule_items(rules):
        return "[" + ", ".join(
            json.dumps(r.text) if r.expires is None else
            "{target = %s, expires = %s}" % (json.dumps(r.text), r.expires.isoformat())
            for r in rules) + "]"
    out = []
    for name, group in policy.groups.items():
        out += [f'[groups."{name}"]', f"allow = {rule_items(group.allow)}",
                f"deny = {rule_items(group.deny)}"]
    for name, user in policy.users.items():
        out += [f'[users."{name}"]', f"groups = {json.dumps(list(user.groups))}",
                f"allow = {rule_items(user.allow)}", f"deny = {rule_items(user.deny)}"]
        if user.expires is not None:
            out.append(f"expires = {user.expires.isoformat()}")
        if user.keys is not None:
            out.append(f"keys = {json.dumps(list(user.keys))}")
    return "\n".join(out) + "\n"


@given(policies())
def test_dict_round_trip(policy):
    assert policy_from_dict(json.loads(json.dumps(policy_to_dict(policy)))) == policy


@given(policies())
def test_toml_round_trip(policy):
    assert parse_policy(to_toml(policy)) == policy


toml_ish = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from([
        "[users.alice]", "[groups.ops]", "[users.Bad]", "allow = [", '"10.0.0.1:22",', "]",
        'allow = ["10.0.0.1/8"]', "deny = [1]", "expires = 2027-01-01T00:00:00",
        "expires = 2027-01-01T00:00:00Z", 'groups = ["ops"]', "keys = [\"x\"]", "x = 1",
        '{target = "10.0.0.1", expires = 2020-01-01}', "\0", "# comment", "",
    ]), max_size=12).map("\n".join),
)


@given(toml_ish)
def test_any_text_parses_or_fails_with_file_and_line(text):
    try:
        policy = parse_policy(text, "f.toml")
    except PolicyFileError as err:
        match = re.match(r"f\.toml:(\d+): \S", str(err))
        assert match, str(err)
        assert 1 <= int(match.group(1)) <= text.count("\n") + 1
        return
    assert isinstance(policy, Policy)
    assert policy_from_dict(policy_to_dict(policy)) == policy
