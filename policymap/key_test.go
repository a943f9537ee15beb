package policymap

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
)

// label63 and name253 are the longest label and name (RFC 1035 §2.3.4).
var (
	label63 = strings.Repeat("a", 63)
	// 3 labels of 63 octets, one of 61, and 3 dots: 253 octets.
	name253 = label63 + "." + label63 + "." + label63 + "." + strings.Repeat("b", 61)
)

// keyTests covers every rule of SPEC section 2. It also seeds
// FuzzNormalizeKey. A want of "" means the key is rejected with reason.
var keyTests = []struct {
	name   string
	key    string
	want   string
	reason string
}{
	// SPEC 2.1, 2.2: a recipient domain, as Postfix passes it.
	{"lowercase", "example.com", "example.com", ""},
	{"mixed case", "Example.COM", "example.com", ""},
	{"spaces", " example.com ", "example.com", ""},
	{"tab", "\texample.com\t", "example.com", ""},
	{"trailing dot", "HOST.EXAMPLE.", "host.example", ""},
	{"two trailing dots", "example.com..", "", "invalid_name"},
	{"single label", "localhost", "localhost", ""},
	{"digits and hyphens", "mx-1.9host.example", "mx-1.9host.example", ""},
	{"hyphens in positions 3 and 4", "r3---sn-abc.example", "r3---sn-abc.example", ""},

	// SPEC 2.3: next-hops from transport maps and relayhost.
	{"brackets", "[mail.example.com]", "mail.example.com", ""},
	{"brackets and port", "[mail.example.com]:587", "mail.example.com", ""},
	{"brackets mixed case", "[Mail.Example.COM]:25", "mail.example.com", ""},
	{"brackets trailing dot", "[mail.example.com.]", "mail.example.com", ""},
	{"host and port", "example.com:25", "example.com", ""},
	{"host trailing dot and port", "example.com.:25", "example.com", ""},
	{"port 65535", "[mail.example.com]:65535", "mail.example.com", ""},
	{"port not digits", "[mail.example.com]:x", "", "invalid_name"},
	{"service name port", "[mail.example.com]:submission", "", "invalid_name"},
	{"port too large", "[mail.example.com]:65536", "", "invalid_name"},
	{"port too long", "[mail.example.com]:000025", "", "invalid_name"},
	{"port empty", "[mail.example.com]:", "", "invalid_name"},
	{"host port empty", "example.com:", "", "invalid_name"},
	{"host port not digits", "example.com:smtp", "", "invalid_name"},
	{"empty port host", ":25", "", "invalid_name"},
	{"unclosed bracket", "[mail.example.com", "", "invalid_name"},
	{"unopened bracket", "mail.example.com]", "", "invalid_name"},
	{"text after bracket", "[mail.example.com]x", "", "invalid_name"},
	{"dot after bracket", "[mail.example.com].", "", "invalid_name"},
	{"nested brackets", "[[mail.example.com]]", "", "invalid_name"},
	{"empty brackets", "[]", "", "invalid_name"},
	{"parent inside brackets", "[.example.com]", "", "invalid_name"},

	// SPEC 2.2: U-labels become A-labels.
	{"U-label", "bücher.example", "xn--bcher-kva.example", ""},
	{"U-label upper case", "BÜCHER.example", "xn--bcher-kva.example", ""},
	{"U-label trailing dot", "bücher.example.", "xn--bcher-kva.example", ""},
	{"U-label ideographic full stop", "bücher。example", "xn--bcher-kva.example", ""},
	{"U-label ideographic trailing dot", "bücher.example。", "xn--bcher-kva.example", ""},
	{"U-label two trailing dots", "bücher.example.。", "", "invalid_name"},
	{"U-label brackets and port", "[MAIL.bücher.example]:25", "mail.xn--bcher-kva.example", ""},
	{"U-label non-transitional", "faß.de", "xn--fa-hia.de", ""},
	{"full-width letters", "ｅｘａｍｐｌｅ.com", "example.com", ""},
	{"A-label", "xn--bcher-kva.example", "xn--bcher-kva.example", ""},
	{"A-label upper case", "XN--BCHER-KVA.example", "xn--bcher-kva.example", ""},
	{"A-label and U-label", "xn--bcher-kva.bücher.example", "xn--bcher-kva.xn--bcher-kva.example", ""},
	{"A-label invalid punycode", "xn--zz.example", "", "invalid_name"},
	{"A-label decodes to ASCII", "xn--abc-.example", "", "invalid_name"},
	{"A-label empty", "xn--.example", "", "invalid_name"},
	{"A-label of upper-case U-label", "xn--b-xda.example", "", "invalid_name"},  // "Àb"
	{"A-label of ignored code point", "xn--ab-5da.example", "", "invalid_name"}, // "a\u00adb"
	{"A-label ContextJ", "xn--ab-n1t.example", "", "invalid_name"},              // "ab\u200d"
	{"U-label ContextJ", "ab\u200d.example", "", "invalid_name"},
	{"U-label ignored code point", "a\u00adb.example", "ab.example", ""}, // UTS-46 drops soft hyphens
	{"U-label symbol", "☃.example", "xn--n3h.example", ""},               // UTS-46 allows what IDNA2008 does not
	{"U-label leading hyphen", "-bücher.example", "", "invalid_name"},
	{"U-label right-to-left", "مثال.bücher.example", "xn--mgbh0fb.xn--bcher-kva.example", ""},
	{"U-label bidi rule mixed label", "aب.example", "", "invalid_name"},
	{"U-label bidi rule digit first", "1.مثال", "", "invalid_name"},
	{"U-label control character", "\u0080x.example", "", "invalid_name"},
	{"U-label with R-LDH label", "ab--cd.bücher.example", "", "invalid_name"},
	{"invalid UTF-8", "b\xffcher.example", "", "invalid_name"},
	{"replacement character", "b\ufffdcher.example", "", "invalid_name"},
	{"U-label space", "bücher example", "", "invalid_name"},
	{"U-label full-width digits", "１９２.０.２.１", "", "ip_literal"},

	// SPEC 2.4: parent-domain walk (RFC 8461 §3.4).
	{"parent", ".example.com", "", "parent_domain"},
	{"parent TLD", ".com", "", "parent_domain"},
	{"parent spaces", " .example.com", "", "parent_domain"},
	{"root", ".", "", "parent_domain"},

	// SPEC 2.4: IP literals.
	{"IPv4", "192.0.2.1", "", "ip_literal"},
	{"IPv4 brackets", "[192.0.2.1]", "", "ip_literal"},
	{"IPv4 brackets port", "[192.0.2.1]:25", "", "ip_literal"},
	{"IPv4 port", "192.0.2.1:25", "", "ip_literal"},
	{"IPv4 trailing dot", "192.0.2.1.", "", "ip_literal"},
	{"IPv6 postfix form", "[ipv6:2001:db8::1]", "", "ip_literal"},
	{"IPv6 postfix form upper case port", "[IPv6:::1]:25", "", "ip_literal"},
	{"IPv6 brackets", "[2001:db8::1]", "", "ip_literal"},
	{"IPv6 bare", "2001:db8::1", "", "ip_literal"},
	{"IPv6 bare loopback", "::1", "", "ip_literal"},
	{"IPv6 bare postfix form", "ipv6:2001:db8::1", "", "ip_literal"},
	{"IPv6 zone", "fe80::1%eth0", "", "ip_literal"},
	{"short IPv4", "127.1", "", "invalid_name"},
	{"numeric TLD", "example.123", "", "invalid_name"},
	{"numeric single label", "12345", "", "invalid_name"},
	{"IPv4 leading zero", "192.0.2.01", "", "invalid_name"},
	{"colons not IPv6", "a:b:c", "", "invalid_name"},
	{"colons in brackets", "[a:b]", "", "invalid_name"},

	// SPEC 2.4: LMTP socket paths.
	{"path", "/var/run/lmtp", "", "path"},
	{"unix path", "unix:/var/run/lmtp", "", "path"},
	{"relative path", "private/lmtp", "", "path"},

	// SPEC 2.4: empty keys.
	{"empty", "", "", "empty"},
	{"spaces only", "   ", "", "empty"},

	// SPEC 2.4: not a host name.
	{"label 63", label63 + ".example", label63 + ".example", ""},
	{"label 64", label63 + "a.example", "", "invalid_name"},
	{"name 253", name253, name253, ""},
	{"name 253 trailing dot", name253 + ".", name253, ""},
	{"name 254", name253 + "b", "", "invalid_name"},
	{"underscore", "_mta-sts.example.com", "", "invalid_name"},
	{"leading hyphen", "-leading.example", "", "invalid_name"},
	{"trailing hyphen", "trailing-.example", "", "invalid_name"},
	{"hyphen label", "-.example", "", "invalid_name"},
	{"empty label", "a..b", "", "invalid_name"},
	{"inner space", "exa mple.com", "", "invalid_name"},
	{"wildcard", "*.example.com", "", "invalid_name"},
	{"at sign", "user@example.com", "", "invalid_name"},
	{"control character", "example.com\n", "", "invalid_name"},
	{"NUL", "example\x00.com", "", "invalid_name"},
	{"huge key", strings.Repeat("a.", 5000) + "com", "", "invalid_name"},
}

func TestNormalizeKey(t *testing.T) {
	for _, tt := range keyTests {
		t.Run(tt.name, func(t *testing.T) {
			// Twice: the second answer may come from the memo of
			// genuine A-label names, and must be the same.
			for range 2 {
				got, err := NormalizeKey(tt.key)
				checkNormalizeKey(t, tt.key, got, err, tt.want, tt.reason)
			}
		})
	}
}

func checkNormalizeKey(t *testing.T, key, got string, err error, want, reason string) {
	t.Helper()
	if reason == "" {
		if err != nil {
			t.Fatalf("NormalizeKey(%q): got error %v, want %q", key, err, want)
		}
		if got != want {
			t.Fatalf("NormalizeKey(%q): got %q, want %q", key, got, want)
		}
		return
	}
	if err == nil {
		t.Fatalf("NormalizeKey(%q): got %q, want error with reason %q", key, got, reason)
	}
	if got != "" {
		t.Errorf("NormalizeKey(%q): got %q with error, want \"\"", key, got)
	}
	if !errors.Is(err, ErrSkip) {
		t.Errorf("NormalizeKey(%q): got error %v, want one wrapping ErrSkip", key, err)
	}
	if r := SkipReason(err); r != reason {
		t.Errorf("SkipReason(NormalizeKey(%q)): got %q, want %q", key, r, reason)
	}
	if msg := err.Error(); strings.Contains(msg, key) && key != "" {
		t.Errorf("NormalizeKey(%q): error %q repeats the key", key, msg)
	}
}

func TestSkipReason(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want string
	}{
		{"nil", nil, ""},
		{"other error", errors.New("boom"), ""},
		{"ErrSkip itself", ErrSkip, ""},
		{"wrapped", fmt.Errorf("lookup: %w", errPath), "path"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := SkipReason(tt.err); got != tt.want {
				t.Errorf("SkipReason(%v): got %q, want %q", tt.err, got, tt.want)
			}
		})
	}
}

// TestIDNAProfile pins the IDNA options (SPEC 2.2), since the cache key
// depends on them.
func TestIDNAProfile(t *testing.T) {
	got := idnaProfile.String()
	want := "NonTransitional:UseSTD3Rules:CheckHyphens:CheckJoiners"
	if got != want {
		t.Errorf("idnaProfile: got %q, want %q", got, want)
	}
}

// TestNormalizeKeyAllocs holds the hot path to its budget: an
// already-lowercase ASCII key costs nothing, a key that needs lowercasing
// one allocation, an A-label name checked once before nothing.
func TestNormalizeKeyAllocs(t *testing.T) {
	tests := []struct {
		key  string
		want float64
	}{
		{"example.com", 0},
		{" example.com. ", 0},
		{"[mail.example.com]:587", 0},
		{"example.com:25", 0},
		{".example.com", 0},
		{"192.0.2.1", 0},
		{"a..b", 0},
		{"Example.COM", 1},
		{"xn--bcher-kva.example", 0}, // a genuine A-label name seen before
	}
	for _, tt := range tests {
		got := testing.AllocsPerRun(100, func() {
			NormalizeKey(tt.key)
		})
		if got != tt.want {
			t.Errorf("NormalizeKey(%q): got %v allocations, want %v", tt.key, got, tt.want)
		}
	}
}

func FuzzNormalizeKey(f *testing.F) {
	for _, tt := range keyTests {
		f.Add(tt.key)
	}
	f.Fuzz(func(t *testing.T, key string) {
		got, err := NormalizeKey(key)
		if err != nil {
			if got != "" {
				t.Errorf("NormalizeKey(%q): got %q with error %v", key, got, err)
			}
			if !errors.Is(err, ErrSkip) {
				t.Errorf("NormalizeKey(%q): error %v does not wrap ErrSkip", key, err)
			}
			switch r := SkipReason(err); r {
			case "empty", "parent_domain", "ip_literal", "path", "invalid_name":
			default:
				t.Errorf("NormalizeKey(%q): unknown reason %q", key, r)
			}
			return
		}
		if msg := hostnameProblem(got); msg != "" {
			t.Fatalf("NormalizeKey(%q) = %q: %s", key, got, msg)
		}
		again, err := NormalizeKey(got)
		if err != nil || again != got {
			t.Errorf("NormalizeKey(%q) = %q, but NormalizeKey(%q) = %q, %v", key, got, got, again, err)
		}
	})
}

// hostnameProblem checks an accepted key independently of checkHostname,
// and says what is wrong with it, or "".
func hostnameProblem(s string) string {
	if s == "" || len(s) > 253 {
		return fmt.Sprintf("length %d not in 1..253", len(s))
	}
	if _, err := netip.ParseAddr(s); err == nil {
		return "an IP address"
	}
	for label := range strings.SplitSeq(s, ".") {
		if len(label) < 1 || len(label) > 63 {
			return fmt.Sprintf("label %q: length %d not in 1..63", label, len(label))
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Sprintf("label %q starts or ends with '-'", label)
		}
		for _, c := range []byte(label) {
			if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
				return fmt.Sprintf("label %q holds %q", label, c)
			}
		}
	}
	return ""
}

func BenchmarkNormalizeKey(b *testing.B) {
	benchmarks := []struct {
		name string
		key  string
	}{
		{"ascii_lowercase", "example.com"},
		{"mixed_case", "Example.COM"},
		{"bracketed", "[mail.example.com]:587"},
		{"u_label", "bücher.example"},
		{"a_label", "xn--bcher-kva.example"},
		{"parent_domain", ".example.com"},
	}
	for _, bm := range benchmarks {
		b.Run(bm.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				NormalizeKey(bm.key)
			}
		})
	}
}

func ExampleNormalizeKey() {
	for _, key := range []string{"Example.COM.", "[mail.example.com]:587", "bücher.example", ".example.com", "[192.0.2.1]"} {
		domain, err := NormalizeKey(key)
		if err != nil {
			fmt.Printf("%q: NOTFOUND (%s)\n", key, SkipReason(err))
			continue
		}
		fmt.Printf("%q: %s\n", key, domain)
	}
	// Output:
	// "Example.COM.": example.com
	// "[mail.example.com]:587": mail.example.com
	// "bücher.example": xn--bcher-kva.example
	// ".example.com": NOTFOUND (parent_domain)
	// "[192.0.2.1]": NOTFOUND (ip_literal)
}
