package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"stsmap/config"
	"stsmap/internal/fixture"
)

const tlsa = "3 1 1 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// DANE and TLSRPT answers, end to end: stsmap's resolver is a real
// validating unbound in front of an nsd serving a zone signed with
// ldns-signzone, so the AD bit comes from a real validator; postmap, the
// reference client, prints each answer verbatim (SPEC 1.6, 7.3, 7.5).
func TestDANEAndTLSRPTWithValidatingResolver(t *testing.T) {
	for _, tool := range []struct{ name, pkg string }{{"unbound", "unbound"}, {"nsd", "nsd"}, {"ldns-signzone", "ldnsutils"}} {
		requireTool(t, tool.name, tool.pkg)
	}
	postmap := requireTool(t, "postmap", "postfix")
	w := fixture.NewWorld(t) // its policy server and CA; DNS comes from the signed zone
	w.Policy.SetPolicy("sts.dane.test", fixture.PolicyBody("enforce", 86400, "mx.sts.dane.test", "*.mx.dane.test"))
	w.Policy.SetPolicy("sts.plain.test", fixture.PolicyBody("enforce", 86400, "mx.sts.plain.test"))
	zone := fixture.StartSignedZone(t, t.TempDir(), "dane.test.", []string{
		// every MX host has usable TLSA: dane-only
		"all.dane.test. MX 10 mx1.dane.test.", "all.dane.test. MX 20 mx2.dane.test.",
		"mx1.dane.test. A 127.0.0.2", "mx2.dane.test. A 127.0.0.3",
		"_25._tcp.mx1.dane.test. TLSA " + tlsa, "_25._tcp.mx2.dane.test. TLSA " + tlsa,
		// one of two: dane
		"some.dane.test. MX 10 mx1.dane.test.", "some.dane.test. MX 20 mx3.dane.test.", "mx3.dane.test. A 127.0.0.4",
		// none, with an MTA-STS policy: secure
		"sts.dane.test. MX 10 mx.sts.dane.test.", "mx.sts.dane.test. A 127.0.0.5",
		`_mta-sts.sts.dane.test. TXT "v=STSv1; id=1"`, "mta-sts.sts.dane.test. A 127.0.0.1",
	}, fixture.UnsignedZone{Zone: "plain.test.", Records: []string{
		// TLSA without DNSSEC counts for nothing: the MTA-STS answer
		"sts.plain.test. MX 10 mx.sts.plain.test.", "mx.sts.plain.test. A 127.0.0.6",
		"_25._tcp.mx.sts.plain.test. TLSA " + tlsa,
		`_mta-sts.sts.plain.test. TXT "v=STSv1; id=1"`, "mta-sts.sts.plain.test. A 127.0.0.1",
	}})
	cfg := testConfig(w, "127.0.0.1:0")
	cfg.DNS.Nameservers = []string{zone.Resolver}
	cfg.Maps["tlsrpt"] = config.MapConfig{TLSRPT: ptr(true)}
	addrs := startServe(t, cfg, testEnv(w))
	confDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(confDir, "main.cf"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		mapName, key, want string
	}{
		{"postfix", "all.dane.test", "dane-only"},
		{"postfix", "some.dane.test", "dane"},
		{"postfix", "[mx1.dane.test]", "dane-only"},
		{"postfix", "sts.dane.test", "secure match=mx.sts.dane.test:.mx.dane.test servername=hostname"},
		{"postfix", "sts.plain.test", "secure match=mx.sts.plain.test servername=hostname"},
		{"tlsrpt", "sts.dane.test", "secure match=mx.sts.dane.test:.mx.dane.test servername=hostname" +
			" policy_type=sts policy_domain=sts.dane.test mx_host_pattern=mx.sts.dane.test mx_host_pattern=*.mx.dane.test" +
			" { policy_string = version: STSv1 } { policy_string = mode: enforce } { policy_string = mx: mx.sts.dane.test }" +
			" { policy_string = mx: *.mx.dane.test } { policy_string = max_age: 86400 }"},
		{"tlsrpt", "all.dane.test", "dane-only"},
	}
	for _, tt := range tests {
		cmd := exec.Command(postmap, "-c", confDir, "-q", tt.key, "socketmap:inet:"+addrs[0].String()+":"+tt.mapName)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		cmd.Run()
		if got := strings.TrimSuffix(out.String(), "\n"); got != tt.want {
			t.Errorf("postmap -q %s (map %s): got %q (stderr %q), want %q\nvalidator logs:\n%s", tt.key, tt.mapName, got, errb.String(), tt.want, zone.Logs())
		}
	}
}
