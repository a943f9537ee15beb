package policymap

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"stsmap/resolver"
)

func policy(mode resolver.Mode, mx ...string) *resolver.Policy {
	return &resolver.Policy{Mode: mode, MaxAge: 24 * time.Hour, MX: mx}
}

var (
	plain  = Settings{}
	sni    = Settings{Servername: true}
	strict = Settings{StrictTesting: true, Servername: true}
	tlsrpt = Settings{Servername: true, TLSRPT: true}
)

func TestAnswer(t *testing.T) {
	tests := []struct {
		name     string
		policy   *resolver.Policy
		settings Settings
		want     string // "" means NOTFOUND
	}{
		// SPEC 7.1
		{"enforce single mx", policy(resolver.ModeEnforce, "mx1.example.net"), sni,
			"secure match=mx1.example.net servername=hostname"},
		{"enforce mx in order", policy(resolver.ModeEnforce, "mx2.example.net", "mx1.example.net", "backup.example.org"), sni,
			"secure match=mx2.example.net:mx1.example.net:backup.example.org servername=hostname"},
		{"wildcard", policy(resolver.ModeEnforce, "*.example.net"), sni,
			"secure match=.example.net servername=hostname"},
		{"wildcard and host", policy(resolver.ModeEnforce, "mx.example.net", "*.example.net"), sni,
			"secure match=mx.example.net:.example.net servername=hostname"},
		{"duplicates", policy(resolver.ModeEnforce, "mx1.example.net", "mx2.example.net", "mx1.example.net"), sni,
			"secure match=mx1.example.net:mx2.example.net servername=hostname"},
		{"case duplicates", policy(resolver.ModeEnforce, "MX1.Example.NET", "mx1.example.net", "*.EXAMPLE.net", "*.example.net"), sni,
			"secure match=mx1.example.net:.example.net servername=hostname"},
		{"servername off", policy(resolver.ModeEnforce, "mx1.example.net", "*.example.net"), plain,
			"secure match=mx1.example.net:.example.net"},
		{"enforce ignores strict testing", policy(resolver.ModeEnforce, "mx1.example.net"), Settings{StrictTesting: true},
			"secure match=mx1.example.net"},

		// SPEC 7.2
		{"testing", policy(resolver.ModeTesting, "mx1.example.net"), sni, ""},
		{"testing strict", policy(resolver.ModeTesting, "mx1.example.net", "*.example.net"), strict,
			"secure match=mx1.example.net:.example.net servername=hostname"},
		{"testing strict no servername", policy(resolver.ModeTesting, "mx1.example.net"), Settings{StrictTesting: true},
			"secure match=mx1.example.net"},
		{"none", policy(resolver.ModeNone), sni, ""},
		{"none with mx", policy(resolver.ModeNone, "mx1.example.net"), strict, ""},
		{"nil", nil, strict, ""},
		{"unknown mode", policy("Enforce", "mx1.example.net"), strict, ""},
		{"empty mode", policy("", "mx1.example.net"), strict, ""},

		// SPEC 7.1: never an empty match=, never a literal "*", never
		// anything that would change the meaning of Postfix's text.
		{"enforce no mx", policy(resolver.ModeEnforce), sni, ""},
		{"testing strict no mx", policy(resolver.ModeTesting), strict, ""},
		{"only invalid mx", policy(resolver.ModeEnforce, "*", "", "*."), sni, ""},
		{"bare star dropped", policy(resolver.ModeEnforce, "*", "mx1.example.net"), sni,
			"secure match=mx1.example.net servername=hostname"},
		{"inner star dropped", policy(resolver.ModeEnforce, "mx.*.example.net", "*.*.example.net", "mx1.example.net"), plain,
			"secure match=mx1.example.net"},
		{"colon dropped", policy(resolver.ModeEnforce, "mx1.example.net:mx2.evil.example", "mx1.example.net"), plain,
			"secure match=mx1.example.net"},
		{"space dropped", policy(resolver.ModeEnforce, "mx1.example.net servername=evil.example", "mx1.example.net"), plain,
			"secure match=mx1.example.net"},
		{"control character dropped", policy(resolver.ModeEnforce, "mx1.example.net\n", "mx2.example.net"), plain,
			"secure match=mx2.example.net"},
		{"IP literal dropped", policy(resolver.ModeEnforce, "192.0.2.1", "*.192.0.2.1", "mx1.example.net"), plain,
			"secure match=mx1.example.net"},
		{"leading dot dropped", policy(resolver.ModeEnforce, ".example.net", "mx1.example.net"), plain,
			"secure match=mx1.example.net"},
		{"trailing dot dropped", policy(resolver.ModeEnforce, "mx1.example.net.", "mx2.example.net"), plain,
			"secure match=mx2.example.net"},
		{"U-label dropped", policy(resolver.ModeEnforce, "mx.bücher.example", "mx2.example.net"), plain,
			"secure match=mx2.example.net"},
		{"A-label kept", policy(resolver.ModeEnforce, "mx.xn--bcher-kva.example"), plain,
			"secure match=mx.xn--bcher-kva.example"},
		{"single-label wildcard", policy(resolver.ModeEnforce, "*.net"), plain,
			"secure match=.net"},
		{"Postfix keywords dropped", policy(resolver.ModeEnforce, "hostname", "NEXTHOP", "dot-nexthop", "mx1.example.net"), plain,
			"secure match=mx1.example.net"},
		{"only Postfix keywords", policy(resolver.ModeEnforce, "hostname"), plain, ""},
		{"Postfix keywords as domains kept", policy(resolver.ModeEnforce, "*.hostname", "hostname.example", "nexthop.example"), plain,
			"secure match=.hostname:hostname.example:nexthop.example"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkAnswer(t, "example.com", tt.policy, tt.settings, tt.want)
		})
	}
}

// checkAnswer checks Answer and AppendAnswer, the latter onto a non-empty
// buffer that must be left as it was on NOTFOUND.
func checkAnswer(t *testing.T, domain string, p *resolver.Policy, s Settings, want string) {
	t.Helper()
	got, ok := Answer(domain, p, s)
	if wantOK := want != ""; ok != wantOK || got != want {
		t.Errorf("Answer: got %q, %v; want %q, %v", got, ok, want, wantOK)
	}
	const prefix = "OK "
	buf, ok := AppendAnswer([]byte(prefix), domain, p, s)
	if want == "" {
		if ok || string(buf) != prefix {
			t.Errorf("AppendAnswer: got %q, %v; want %q, false", buf, ok, prefix)
		}
		return
	}
	if !ok || string(buf) != prefix+want {
		t.Errorf("AppendAnswer: got %q, %v; want %q, true", buf, ok, prefix+want)
	}
}

// TestAnswerLargePolicy answers a policy of 64 KiB of mx lines, the largest
// body fetched (SPEC 4.5). The socketmap server enforces the reply limit
// (SPEC 1.4); here the answer must only be complete.
func TestAnswerLargePolicy(t *testing.T) {
	var mx []string
	var want strings.Builder
	want.WriteString("secure match=")
	size := 0
	for i := 0; ; i++ {
		host := fmt.Sprintf("mx%05d.example.net", i)
		line := "mx: " + host + "\r\n"
		if size+len(line) > resolver.MaxPolicySize {
			break
		}
		size += len(line)
		mx = append(mx, host)
		if i > 0 {
			want.WriteByte(':')
		}
		want.WriteString(host)
	}
	want.WriteString(" servername=hostname")

	got, ok := AppendAnswer(nil, "example.net", policy(resolver.ModeEnforce, mx...), sni)
	if !ok {
		t.Fatalf("AppendAnswer with %d mx: got NOTFOUND", len(mx))
	}
	if len(got) != want.Len() {
		t.Errorf("AppendAnswer with %d mx: got %d bytes, want %d", len(mx), len(got), want.Len())
	}
	if string(got) != want.String() {
		t.Errorf("AppendAnswer with %d mx: answer differs from the expected one", len(mx))
	}
}

// TestAnswerLongDuplicates covers the map used to find duplicates in long
// mx lists.
func TestAnswerLongDuplicates(t *testing.T) {
	var mx, want []string
	for i := range 3 * maxLinearDedup {
		host := fmt.Sprintf("mx%d.example.net", i%maxLinearDedup)
		mx = append(mx, host, strings.ToUpper(host), "*."+host)
		if i < maxLinearDedup {
			want = append(want, host, "."+host)
		}
	}
	checkAnswer(t, "example.net", policy(resolver.ModeEnforce, mx...), plain, "secure match="+strings.Join(want, ":"))
}

// TestAppendAnswerAllocs holds the hot path to its budget: appending to a
// buffer with room costs nothing, with or without the TLSRPT attributes.
func TestAppendAnswerAllocs(t *testing.T) {
	p := policy(resolver.ModeEnforce, "mx1.example.net", "mx2.example.net", "*.example.net")
	p.Lines = []string{"version: STSv1", "mode: enforce", "mx: mx1.example.net", "mx: mx2.example.net", "mx: *.example.net", "max_age: 86400"}
	for _, s := range []Settings{plain, sni, tlsrpt} {
		buf := make([]byte, 0, 1024)
		got := testing.AllocsPerRun(100, func() {
			buf, _ = AppendAnswer(buf[:0], "example.net", p, s)
		})
		if got != 0 {
			t.Errorf("AppendAnswer with %+v: got %v allocations, want 0", s, got)
		}
	}
}

func BenchmarkAppendAnswer(b *testing.B) {
	three := policy(resolver.ModeEnforce, "mx1.example.net", "mx2.example.net", "*.example.net")
	three.Lines = []string{"version: STSv1", "mode: enforce", "mx: mx1.example.net", "mx: mx2.example.net", "mx: *.example.net", "max_age: 86400"}
	benchmarks := []struct {
		name     string
		policy   *resolver.Policy
		settings Settings
	}{
		{"one_mx", policy(resolver.ModeEnforce, "mx1.example.net"), sni},
		{"three_mx", three, sni},
		{"three_mx_tlsrpt", three, tlsrpt},
		{"notfound", policy(resolver.ModeTesting, "mx1.example.net"), sni},
	}
	for _, bm := range benchmarks {
		b.Run(bm.name, func(b *testing.B) {
			b.ReportAllocs()
			buf := make([]byte, 0, 1024)
			for b.Loop() {
				buf, _ = AppendAnswer(buf[:0], "example.net", bm.policy, bm.settings)
			}
		})
	}
}

func ExampleAnswer() {
	p := &resolver.Policy{
		Mode:   resolver.ModeEnforce,
		MaxAge: 7 * 24 * time.Hour,
		MX:     []string{"mx1.example.com", "*.example.net"},
	}
	text, ok := Answer("example.com", p, Settings{Servername: true})
	fmt.Println(ok, text)

	p.Mode = resolver.ModeTesting
	text, ok = Answer("example.com", p, Settings{})
	fmt.Println(ok, text == "")
	// Output:
	// true secure match=mx1.example.com:.example.net servername=hostname
	// false true
}

// The TLSRPT attributes of Postfix 3.10 (SPEC 7.3), one per line here.
func ExampleAnswer_tlsrpt() {
	p := &resolver.Policy{
		Mode:   resolver.ModeEnforce,
		MaxAge: 7 * 24 * time.Hour,
		MX:     []string{"mx1.example.com", "*.example.net"},
		Lines:  []string{"version: STSv1", "mode: enforce", "mx: mx1.example.com", "mx: *.example.net", "max_age: 604800"},
	}
	text, _ := Answer("example.com", p, Settings{Servername: true, TLSRPT: true})
	fmt.Println(strings.NewReplacer(" policy_type", "\n policy_type", " mx_host", "\n mx_host", " {", "\n {").Replace(text))
	// Output:
	// secure match=mx1.example.com:.example.net servername=hostname
	//  policy_type=sts policy_domain=example.com
	//  mx_host_pattern=mx1.example.com
	//  mx_host_pattern=*.example.net
	//  { policy_string = version: STSv1 }
	//  { policy_string = mode: enforce }
	//  { policy_string = mx: mx1.example.com }
	//  { policy_string = mx: *.example.net }
	//  { policy_string = max_age: 604800 }
}
