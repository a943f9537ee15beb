package resolver

import (
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// maxFuzzErrLen bounds the text of any error or reason built from a reply
// (SPEC 8.3): fixed words and names clipped to maxErrNameLen.
const maxFuzzErrLen = 300

// FuzzDNSReply feeds raw replies through what the resolver does with a
// reply once it is read: checkReply (unpacking; ID, QR, opcode and
// question matching), finalRcode, lookupChain.follow (owner and type
// filtering, CNAMEs followed within the reply and across queries, TTL and
// AD) and, for TXT, txtStrings and SelectRecord. A CNAME whose target has no
// data is followed by feeding the same reply again, as from a server that
// gives one answer to every question. Properties: no panic; results only
// hold records of the asked type, class IN, at the end of the chain, of the
// Go types the callers assert; errors are ErrNoRecord or ErrDNS and bounded
// in length; the lookup ends within maxCNAMESteps+1 replies.
//
// The seed corpus in testdata/fuzz/FuzzDNSReply holds the packed replies of
// dnsReplySeeds.
func FuzzDNSReply(f *testing.F) {
	seeds := dnsReplySeeds(f)
	for _, name := range slices.Sorted(maps.Keys(seeds)) {
		f.Add(seeds[name])
	}
	f.Fuzz(func(t *testing.T, wire []byte) {
		parsed := new(dns.Msg)
		if parsed.Unpack(wire) != nil {
			t.Skip()
		}
		// The query the reply claims to answer, when it names one, so
		// that the fuzzer reaches past the question check; else ours.
		qname, qtype := hostileName, dns.TypeTXT
		if len(parsed.Question) == 1 {
			q := parsed.Question[0]
			if _, ok := dns.IsDomainName(q.Name); ok && q.Name != "." {
				qname, qtype = q.Name, q.Qtype
			}
		}
		query := new(dns.Msg).SetQuestion(qname, qtype)
		query.SetEdns0(ednsUDPSize, true)
		query.Id = parsed.Id

		// RFC 5452 §9.1: a reply with another ID is never ours.
		other := query.Copy()
		other.Id++
		if _, reason := checkReply(other, wire); reason == "" {
			t.Fatalf("checkReply accepted a reply with ID %d for query ID %d", parsed.Id, other.Id)
		}
		reply, reason := checkReply(query, wire)
		if reason != "" {
			if len(reason) > maxFuzzErrLen {
				t.Fatalf("checkReply reason is %d bytes", len(reason))
			}
			return
		}
		if !finalRcode(reply.Rcode) {
			return // query moves on to the next server
		}
		c, err := newLookupChain(qname, qtype)
		if err != nil {
			checkLookupErr(t, err)
			return
		}
		for range maxCNAMESteps + 1 {
			before := len(c.chain)
			rrs, ans, more, err := c.follow(reply)
			switch {
			case more && (err != nil || rrs != nil || len(c.chain) <= before):
				t.Fatalf("follow: more with %d RRs, error %v, chain %d -> %d", len(rrs), err, before, len(c.chain))
			case more:
				continue
			case err != nil:
				if rrs != nil {
					t.Fatalf("follow: %d RRs with error %v", len(rrs), err)
				}
				checkLookupErr(t, err)
				return
			}
			checkLookupRRs(t, c, reply, rrs, ans)
			if qtype == dns.TypeTXT {
				if _, err := SelectRecord(txtStrings(rrs)); err != nil && len(err.Error()) > maxFuzzErrLen {
					t.Fatalf("SelectRecord error is %d bytes", len(err.Error()))
				}
			}
			return
		}
		t.Fatalf("lookup not ended after %d replies; chain %q", maxCNAMESteps+1, c.chain)
	})
}

// checkLookupErr checks a failed lookup's error: one of the classes the
// cache relies on (SPEC 3.4), with bounded text (SPEC 8.3).
func checkLookupErr(t *testing.T, err error) {
	t.Helper()
	if errors.Is(err, ErrNoRecord) == errors.Is(err, ErrDNS) {
		t.Fatalf("error %v is not exactly one of ErrNoRecord and ErrDNS", err)
	}
	if n := len(err.Error()); n > maxFuzzErrLen {
		t.Fatalf("error is %d bytes: %.400s", n, err)
	}
}

// checkLookupRRs checks the RRs and Answer of a successful lookup.
func checkLookupRRs(t *testing.T, c *lookupChain, reply *dns.Msg, rrs []dns.RR, ans Answer) {
	t.Helper()
	if len(rrs) == 0 {
		t.Fatal("follow: no RRs and no error")
	}
	for _, rr := range rrs {
		h := rr.Header()
		if h.Rrtype != c.qtype || h.Class != dns.ClassINET || !strings.EqualFold(h.Name, c.cur()) {
			t.Fatalf("follow returned %v for %s %s", rr, c.cur(), dns.Type(c.qtype))
		}
		// LookupTXT, LookupHost, LookupMX and LookupTLSA assert these.
		var ok bool
		switch c.qtype {
		case dns.TypeTXT:
			_, ok = rr.(*dns.TXT)
		case dns.TypeA:
			_, ok = rr.(*dns.A)
		case dns.TypeAAAA:
			_, ok = rr.(*dns.AAAA)
		case dns.TypeMX:
			_, ok = rr.(*dns.MX)
		case dns.TypeTLSA:
			_, ok = rr.(*dns.TLSA)
		default:
			ok = true
		}
		if !ok {
			t.Fatalf("follow returned a %T for %s", rr, dns.Type(c.qtype))
		}
		// RFC 2181 §8; the smallest TTL of the data.
		if ans.TTL > time.Duration(rrTTL(h.Ttl))*time.Second {
			t.Fatalf("Answer.TTL %v above the TTL %d of %v", ans.TTL, h.Ttl, rr)
		}
	}
	if ans.Authentic != reply.AuthenticatedData {
		t.Fatalf("Answer.Authentic = %v from replies with AD %v", ans.Authentic, reply.AuthenticatedData)
	}
}

// dnsReplySeeds returns packed replies, named, as a recursive resolver
// sends them to the resolver's queries: the seeds of FuzzDNSReply, and the
// content of its checked-in corpus.
func dnsReplySeeds(tb testing.TB) map[string][]byte {
	tb.Helper()
	rr := func(text string) dns.RR {
		r, err := dns.NewRR(text)
		if err != nil {
			tb.Fatalf("dns.NewRR(%q): %v", text, err)
		}
		return r
	}
	reply := func(qname string, qtype uint16, rcode int, edit func(m *dns.Msg), answer ...string) []byte {
		q := new(dns.Msg).SetQuestion(qname, qtype)
		q.SetEdns0(ednsUDPSize, true)
		m := new(dns.Msg).SetRcode(q, rcode)
		m.RecursionAvailable = true
		m.SetEdns0(ednsUDPSize, true)
		for _, a := range answer {
			m.Answer = append(m.Answer, rr(a))
		}
		if edit != nil {
			edit(m)
		}
		m.Compress = true
		wire, err := m.Pack()
		if err != nil {
			tb.Fatalf("packing a seed: %v", err)
		}
		return wire
	}
	soa := func(m *dns.Msg) {
		m.Ns = []dns.RR{rr("example.com. 3600 IN SOA ns.example.com. hostmaster.example.com. 1 7200 900 1209600 300")}
	}
	return map[string][]byte{
		"txt": reply(hostileName, dns.TypeTXT, dns.RcodeSuccess, func(m *dns.Msg) { m.AuthenticatedData = true },
			hostileName+` 300 IN TXT "v=STSv1; id=2016" "0831085700Z;"`,
			hostileName+` 300 IN TXT "v=spf1 -all"`,
			hostileName+` 300 IN TXT "a\"b\\c\001d\255"`),
		"cname_chain": reply(hostileName, dns.TypeTXT, dns.RcodeSuccess, nil,
			hostileName+` 3600 IN CNAME _mta-sts.provider.example.`,
			`_mta-sts.provider.example. 60 IN CNAME sts.cdn.example.`,
			`sts.cdn.example. 300 IN TXT "v=STSv1; id=delegated"`),
		"cname_unchased": reply(hostileName, dns.TypeTXT, dns.RcodeSuccess, nil,
			hostileName+` 300 IN CNAME _mta-sts.provider.example.`),
		"truncated":    reply(hostileName, dns.TypeTXT, dns.RcodeSuccess, func(m *dns.Msg) { m.Truncated = true }),
		"nxdomain_soa": reply(hostileName, dns.TypeTXT, dns.RcodeNameError, soa),
		"nodata_soa":   reply(hostileName, dns.TypeTXT, dns.RcodeSuccess, soa, hostileName+` 300 IN A 192.0.2.1`),
		"servfail":     reply(hostileName, dns.TypeTXT, dns.RcodeServerFailure, nil),
		"mx_tlsa": reply("example.com.", dns.TypeMX, dns.RcodeSuccess, func(m *dns.Msg) {
			m.Extra = append(m.Extra, rr("_25._tcp.mx.example.com. 300 IN TLSA 3 1 1 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"))
		}, `example.com. 300 IN MX 10 mx.example.com.`, `example.com. 300 IN MX 0 .`),
		"a_high_ttl": reply("mta-sts.example.com.", dns.TypeA, dns.RcodeSuccess, nil,
			`mta-sts.example.com. 4294967295 IN A 192.0.2.1`, `mta-sts.example.com. 300 IN AAAA 2001:db8::1`),
	}
}
