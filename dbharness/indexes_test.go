package main

import (
	"encoding/binary"
	"strings"
	"testing"

	"go.mongodb.org/mongo-driver/x/bsonx/bsoncore"
)

// opMsgOf builds an OP_MSG of the given flags and sections, with its checksum when flagged.
func opMsgOf(flags uint32, sections ...[]byte) []byte {
	message := make([]byte, headerSize+4)
	binary.LittleEndian.PutUint32(message[12:16], opMsg)
	binary.LittleEndian.PutUint32(message[16:20], flags)
	for _, section := range sections {
		message = append(message, section...)
	}
	if flags&checksumPresentBit != 0 {
		message = append(message, 0, 0, 0, 0)
	}
	binary.LittleEndian.PutUint32(message[0:4], uint32(len(message)))
	return message
}

func body(doc bsoncore.Document) []byte {
	return append([]byte{0}, doc...)
}

func documentSequence(identifier string, docs ...bsoncore.Document) []byte {
	payload := append([]byte(identifier), 0)
	for _, doc := range docs {
		payload = append(payload, doc...)
	}
	section := []byte{1, 0, 0, 0, 0}
	binary.LittleEndian.PutUint32(section[1:5], uint32(4+len(payload)))
	return append(section, payload...)
}

func TestParseCommand(t *testing.T) {
	insert := bsoncore.NewDocumentBuilder().
		AppendString("insert", "things").AppendBoolean("ordered", true).AppendString("$db", "probe").Build()
	ping := bsoncore.NewDocumentBuilder().AppendInt32("ping", 1).AppendString("$db", "admin").Build()
	doc := bsoncore.NewDocumentBuilder().AppendString("_id", "a").Build()

	for name, tc := range map[string]struct {
		message []byte
		want    command
	}{
		"body only":                {opMsgOf(0, body(insert)), command{"insert", "things", "probe"}},
		"documents after the body": {opMsgOf(0, body(insert), documentSequence("documents", doc, doc)), command{"insert", "things", "probe"}},
		"documents before the body": {
			opMsgOf(0, documentSequence("documents", doc), body(insert)), command{"insert", "things", "probe"},
		},
		"with a checksum":         {opMsgOf(checksumPresentBit, body(insert)), command{"insert", "things", "probe"}},
		"no collection":           {opMsgOf(0, body(ping)), command{"ping", "", "admin"}},
		"truncated body":          {opMsgOf(0, body(insert)[:10]), command{}},
		"bad sequence size":       {opMsgOf(0, []byte{1, 0xff, 0xff, 0, 0}, body(insert)), command{}},
		"unknown section kind":    {opMsgOf(0, []byte{7}, body(insert)), command{}},
		"not an OP_MSG":           {make([]byte, headerSize+8), command{}},
		"shorter than the header": {[]byte{1, 2, 3}, command{}},
	} {
		if got := parseCommand(tc.message); got != tc.want {
			t.Errorf("%s: parseCommand = %+v, want %+v", name, got, tc.want)
		}
	}
}

func TestTableIndexes(t *testing.T) {
	settings := `{"uuid":"u","indexes":[
		{"name":"_id_","key":[{"field":"_id","descending":false}],"unique":true},
		{"name":"role_id","key":[{"field":"role"},{"field":"_id"}]},
		{"name":"username_key_unique","key":[{"field":"username_key"}],"unique":true},
		{"name":"pending_mail_id","key":[{"field":"pending_mail.id"}]},
		{"name":"created_at_desc","key":[{"field":"created_at","descending":true}]}
	],"cappedSize":0,"cappedDocuments":0}`
	got := map[string]string{}
	for _, index := range tableIndexes("users_1", settings) {
		if index.table != "users_1" {
			t.Errorf("%s: table %q", index.name, index.table)
		}
		got[index.name] = strings.Join(index.columns, ", ")
	}
	want := map[string]string{
		"_ferretdb_id_users_1":                     `_ferretdb_sjson->'$._id'`,
		"_ferretdb_idtype_users_1":                 `_ferretdb_sjson->>'$."$s".p._id.t'`,
		"_ferretdb_ix_users_1_role_id":             `_ferretdb_sjson->>'$.role', _ferretdb_sjson->'$._id'`,
		"_ferretdb_ix_users_1_username_key_unique": `_ferretdb_sjson->>'$.username_key'`,
		"_ferretdb_ix_users_1_created_at_desc":     `_ferretdb_sjson->>'$.created_at'`,
		// role_id ends on _id: a sorted keyset, whose other keys' types the patch checks
		"_ferretdb_type_users_1_role": `_ferretdb_sjson->>'$."$s".p.role.t'`,
	}
	if len(got) != len(want) {
		t.Errorf("tableIndexes = %v, want %v (no index for _id alone, none on a dotted field)", got, want)
	}
	for name, columns := range want {
		if got[name] != columns {
			t.Errorf("%s: columns %q, want %q", name, got[name], columns)
		}
	}
	// Settings the harness cannot read still leave the _id indexes.
	if indexes := tableIndexes("t", "not json"); len(indexes) != 2 {
		t.Errorf("unreadable settings: %v", indexes)
	}
}
